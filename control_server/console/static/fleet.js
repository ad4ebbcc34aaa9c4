// The fleet page, live: each decision updates its run's row in place (epoch, last
// decision, interventions, rollbacks, status); a decision of a run the table does not
// show re-reads the table body from the server, at most once per REFETCH_MS.
"use strict";
(function () {
  const table = document.getElementById("fleet");
  if (!table) return;
  const REFETCH_MS = 2000;
  const REASON_SHOWN = 70;
  let refetchTimer = null;
  let lastRefetch = 0;

  function rowOf(runId) {
    return table.tBodies[0].querySelector('tr[data-run="' + CSS.escape(runId) + '"]');
  }

  function setNumber(row, col, value) {
    const cell = row.querySelector('[data-col="' + col + '"]');
    if (cell) cell.textContent = String(value);
  }

  function addFlag(row, key, text, why, level) {
    const cell = row.querySelector('[data-col="flags"]');
    if (!cell || cell.querySelector('[data-flag="' + key + '"]')) return;
    const badge = document.createElement("span");
    badge.className = "flag " + level;
    badge.dataset.flag = key;
    badge.title = why;
    badge.textContent = text;
    cell.appendChild(badge);
    cell.dataset.sort = String(cell.querySelectorAll(".flag").length);
    row.classList.add("look");
  }

  function truncate(text, shown) {
    return text.length <= shown ? text : text.slice(0, shown - 1).trimEnd() + "…";
  }

  // Decisions that arrived while the table body was being re-read: applied again to
  // the new body, which the server may have rendered before them.
  let arrivedDuringFetch = null;

  function update(row, decision, replay) {
    const action = decision.action || "";
    const source = decision.source || "";
    const reason = decision.reason || "";
    setNumber(row, "epoch", decision.epoch || 0);
    if (decision.late) return;  // recorded for the history, not the run's state now
    const last = row.querySelector('[data-col="last"]');
    if (last) {
      last.title = action + " (" + source + "): " + reason;
      last.textContent = "";
      const word = document.createElement("span");
      word.className = "action " + action.toLowerCase();
      word.textContent = action;
      const text = document.createElement("span");
      text.className = "muted";
      text.textContent = truncate(reason, REASON_SHOWN);
      last.append(word, " ", text);
    }
    const count = (col) => Number(row.querySelector('[data-col="' + col + '"]').textContent) || 0;
    if (action === "INTERVENE" && decision.intervention_index) {
      setNumber(row, "interventions", Math.max(count("interventions"), decision.intervention_index));
    }
    if (action === "ROLLBACK") {
      if (!replay) setNumber(row, "rollbacks", count("rollbacks") + 1);
      addFlag(row, "rolled-back", "rolled back",
        "a rollback (the divergence guard's or an operator's) in the current history", "bad");
    }
    const status = row.querySelector('[data-col="status"]');
    const word = status ? status.dataset.sort : "";
    // A run that reports is active again (a stale one woke up); a finished one stays so.
    if (status && (word === "stale" || word === "unknown")) {
      status.dataset.sort = "active";
      status.innerHTML = '<span class="status active"><span aria-hidden="true">▶</span> active</span>';
      const stale = row.querySelector('[data-flag="stale"]');
      if (stale) stale.remove();
    }
    row.classList.add("updated");
    setTimeout(() => row.classList.remove("updated"), 1500);
  }

  // Re-read the table body (same filters as the page), keeping the chosen order and
  // the runs ticked for comparison.
  async function refetch() {
    refetchTimer = null;
    lastRefetch = Date.now();
    arrivedDuringFetch = new Map();
    let html;
    try {
      const response = await fetch("/fleet/rows" + window.location.search, { headers: { "Accept": "text/html" } });
      if (!response.ok) throw new Error(response.status + " " + response.statusText);
      html = await response.text();
    } catch (error) {
      arrivedDuringFetch = null;
      TC.flash("could not refresh the runs: " + error.message);
      return;
    } finally {
      lastRefetch = Date.now();
    }
    const arrived = arrivedDuringFetch;
    arrivedDuringFetch = null;
    const holder = document.createElement("template");
    holder.innerHTML = "<table>" + html + "</table>";
    const body = holder.content.querySelector("tbody");
    if (!body) return;
    const ticked = new Set(Array.from(table.querySelectorAll('input[name="run"]:checked')).map((box) => box.value));
    body.querySelectorAll('input[name="run"]').forEach((box) => { box.checked = ticked.has(box.value); });
    table.replaceChild(body, table.tBodies[0]);
    arrived.forEach((decision, runId) => { const row = rowOf(runId); if (row) update(row, decision, true); });
    const sorted = table.querySelector("thead th[aria-sort] button.sort");
    if (sorted) { sorted.click(); sorted.click(); }  // the same order again: two flips
    const count = document.getElementById("fleet-count");
    if (count) {
      const runs = Number(body.dataset.count), look = Number(body.dataset.attention);
      count.innerHTML = runs + " run" + (runs === 1 ? "" : "s") + ", <strong>" + look + "</strong> need" + (look === 1 ? "s" : "") + " a look";
    }
    const empty = document.getElementById("fleet-empty");
    if (empty && body.rows.length > 0) empty.remove();
  }

  function scheduleRefetch() {
    if (refetchTimer !== null) return;
    const wait = Math.max(0, lastRefetch + REFETCH_MS - Date.now());
    refetchTimer = setTimeout(refetch, wait);
  }

  const pending = new Map();
  let frame = null;
  // Decisions arrive in bursts (50 a second); rows change at most once a frame.
  function flush() {
    frame = null;
    pending.forEach((decision, runId) => {
      if (arrivedDuringFetch) arrivedDuringFetch.set(runId, decision);
      const row = rowOf(runId);
      if (row) update(row, decision);
      else scheduleRefetch();
    });
    pending.clear();
  }

  TC.live("", (decision) => {
    // Coalescing keeps the newest decision per run; a steering one it would replace
    // is applied at once, so its counts and flags are not lost.
    const earlier = pending.get(decision.run_id);
    if (earlier && earlier.action !== "NONE") {
      const row = rowOf(decision.run_id);
      if (row) update(row, earlier);
    }
    pending.set(decision.run_id, decision);
    if (frame === null) frame = requestAnimationFrame(flush);
  });

  // "Compare selected": at least two runs.
  const compare = document.getElementById("compare");
  if (compare) {
    compare.addEventListener("submit", (event) => {
      const ticked = table.querySelectorAll('input[name="run"]:checked').length;
      if (ticked < 1) { event.preventDefault(); TC.flash("tick the runs to compare first (the boxes in the first column)"); }
    });
  }
})();
