// The console's shared script: the live feed, sortable tables, messages, forms that
// post with the page's CSRF token. Pages add their own code on top (window.TC).
"use strict";
window.TC = (function () {
  const csrf = document.body.dataset.csrf || "";

  // Say something in the page's alert region (role=alert: screen readers read it).
  function flash(text, kind) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = text;
    box.className = "flash " + (kind || "error");
    box.hidden = !text;
  }

  // Decisions as the server makes them: onDecision(decision) for each; the header's
  // "live" badge says whether the feed is connected. runId "" is every run.
  function live(runId, onDecision) {
    const badge = document.getElementById("live");
    const url = "/events" + (runId ? "?run_id=" + encodeURIComponent(runId) : "");
    const source = new EventSource(url);
    source.addEventListener("open", () => {
      if (badge) { badge.hidden = false; badge.textContent = "● live"; badge.dataset.state = "on"; }
    });
    source.addEventListener("error", () => {
      if (badge) { badge.textContent = "○ reconnecting"; badge.dataset.state = "off"; }
    });
    source.addEventListener("decision", (event) => onDecision(JSON.parse(event.data)));
    source.addEventListener("failure", (event) => flash(JSON.parse(event.data)));
    return source;
  }

  // POST a form-encoded body with the CSRF token; resolves to the JSON answer or
  // rejects with the server's words.
  async function post(url, fields) {
    const body = new URLSearchParams(fields);
    const response = await fetch(url, {
      method: "POST",
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
      body: body,
    });
    const answer = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(answer.error || response.statusText);
    return answer;
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { "Accept": "application/json" } });
    const answer = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(answer.error || response.statusText);
    return answer;
  }

  // Tables with class "sortable": each header's button sorts by its column
  // (data-sort on a cell overrides its text; numbers sort as numbers).
  function sortable(table) {
    const heads = table.querySelectorAll("thead th");
    heads.forEach((th, index) => {
      const button = th.querySelector("button.sort");
      if (!button) return;
      button.addEventListener("click", () => {
        const ascending = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach((h) => h.removeAttribute("aria-sort"));
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        const body = table.tBodies[0];
        const rows = Array.from(body.rows);
        const key = (row) => {
          const cell = row.cells[index];
          const raw = cell ? (cell.dataset.sort ?? cell.textContent.trim()) : "";
          const number = Number(raw);
          return raw !== "" && !Number.isNaN(number) ? number : raw.toLowerCase();
        };
        rows.sort((a, b) => {
          const x = key(a), y = key(b);
          const order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
          return ascending ? order : -order;
        });
        rows.forEach((row) => body.appendChild(row));
      });
    });
  }

  document.querySelectorAll("table.sortable").forEach(sortable);
  return { csrf, flash, live, post, getJSON, sortable };
})();
