// The run page: the uPlot chart of the run's curves with its decisions marked, the
// hover area that reads an epoch's decision (mouse, or the arrow keys on the focused
// chart, or a marker's button), and live updates of chart, table and summary.
"use strict";
(function () {
  const holder = document.getElementById("chart");
  const source = document.getElementById("run-data");
  if (!holder || !source || !window.uPlot) return;
  let data = JSON.parse(source.textContent);
  const box = document.getElementById("chart-box");
  const hover = document.getElementById("hover");
  const markerList = document.getElementById("markers");
  const HEIGHT = 340;
  const MARK = {
    intervention: { symbol: "▲", color: "#9a6700" },
    rollback: { symbol: "✕", color: "#b42318" },
    override: { symbol: "◆", color: "#8250df" },
    stop: { symbol: "■", color: "#1b1f24" },
  };
  const number = (v) => (v == null ? "–" : Math.abs(v) < 1e-3 ? v.toExponential(2) : v.toPrecision(4));
  let current = null;  // the index of the epoch the hover area shows

  function columns(d) {
    return [d.epochs, d.train_loss, d.val_loss, d.pseudo_dice, d.lr];
  }

  function drawMarkers(u) {
    const ctx = u.ctx, dpr = window.devicePixelRatio || 1;
    const { left, top, width, height } = u.bbox;
    ctx.save();
    ctx.font = (13 * dpr) + "px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const m of data.markers) {
      const x = Math.round(u.valToPos(m.epoch, "x", true));
      if (x < left || x > left + width) continue;
      const style = MARK[m.kind] || MARK.stop;
      ctx.strokeStyle = style.color;
      ctx.fillStyle = style.color;
      ctx.lineWidth = dpr;
      ctx.setLineDash([4 * dpr, 3 * dpr]);
      ctx.beginPath();
      ctx.moveTo(x, top + 16 * dpr);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      ctx.fillText(style.symbol, x, top + 1 * dpr);
    }
    ctx.restore();
  }

  function say(index) {
    hover.textContent = "";
    if (index == null || index < 0 || index >= data.epochs.length) return;
    current = index;
    const [action, source, reason, what] = data.decisions[index];
    const epoch = data.epochs[index];
    const head = document.createElement("strong");
    head.textContent = "Epoch " + epoch + ": " + (action || "no decision") + (source ? " (" + source + ")" : "");
    const marker = data.markers.find((m) => m.epoch === epoch);
    const parts = [head];
    if (marker) parts.push(" " + marker.label.split(" at epoch")[0]);
    if (what) parts.push(" — " + what);
    parts.push(document.createElement("br"));
    const words = document.createElement("span");
    words.className = "reason";
    words.textContent = reason || "";
    parts.push(words);
    const values = document.createElement("span");
    values.className = "muted";
    values.textContent = "  (train " + number(data.train_loss[index]) + ", val " + number(data.val_loss[index]) +
      ", pseudo Dice " + number(data.pseudo_dice[index]) + ", LR " + number(data.lr[index]) + ")";
    parts.push(values);
    hover.append(...parts);
    // The same epoch's row in the decision table, when it lists it.
    document.querySelectorAll("#decisions tr.current").forEach((tr) => tr.classList.remove("current"));
    const tr = document.querySelector('#decisions tr[data-epoch="' + epoch + '"]');
    if (tr) tr.classList.add("current");
  }

  const options = {
    width: Math.max(320, box.clientWidth - 14),
    height: HEIGHT,
    scales: { x: { time: false }, loss: { auto: true }, dice: { range: [0, 1] }, lr: { distr: 3 } },
    axes: [
      { label: "epoch" },
      { scale: "loss", label: "loss" },
      { scale: "dice", side: 1, label: "pseudo Dice", grid: { show: false } },
      { scale: "lr", side: 1, label: "LR (log)", grid: { show: false }, size: 60,
        values: (u, ticks) => ticks.map((v) => (v == null ? "" : v.toExponential(0))) },
    ],
    series: [
      { label: "epoch", value: (u, v) => (v == null ? "–" : String(v)) },
      { label: "train loss", points: { show: false }, scale: "loss", stroke: "#0969da", width: 1.5, dash: [6, 3], value: (u, v) => number(v) },
      { label: "val loss", points: { show: false }, scale: "loss", stroke: "#bc4c00", width: 2, value: (u, v) => number(v) },
      { label: "pseudo Dice", points: { show: false }, scale: "dice", stroke: "#1a7f37", width: 1.5, value: (u, v) => number(v) },
      { label: "LR", points: { show: false }, scale: "lr", stroke: "#6e7781", width: 1.5, dash: [2, 3], value: (u, v) => number(v) },
    ],
    legend: { live: true },
    hooks: {
      draw: [drawMarkers],
      setCursor: [(u) => { if (u.cursor.idx != null) say(u.cursor.idx); }],
    },
  };
  const chart = new uPlot(options, columns(data), holder);

  // Put the chart's cursor on an epoch (keyboard, marker buttons, tests).
  function pointAt(index) {
    if (!data.epochs.length) return;
    index = Math.max(0, Math.min(data.epochs.length - 1, index));
    const left = chart.valToPos(data.epochs[index], "x");
    const y = data.val_loss[index] ?? data.train_loss[index];
    const top = y == null ? chart.bbox.height / (2 * (window.devicePixelRatio || 1)) : chart.valToPos(y, "loss");
    chart.setCursor({ left, top });
    say(index);
  }

  function indexOfEpoch(epoch) {
    return data.epochs.indexOf(epoch);
  }

  box.addEventListener("keydown", (event) => {
    const last = data.epochs.length - 1;
    const at = current == null ? -1 : current;
    const step = { ArrowRight: 1, ArrowLeft: -1, PageUp: 10, PageDown: -10 }[event.key];
    let next = null;
    if (step !== undefined) next = at < 0 ? (step > 0 ? 0 : last) : at + step;
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = last;
    if (next === null) return;
    event.preventDefault();
    pointAt(next);
  });

  function listMarkers() {
    markerList.querySelectorAll("li.marker").forEach((li) => li.remove());
    for (const m of data.markers) {
      const li = document.createElement("li");
      li.className = "marker";
      const button = document.createElement("button");
      button.type = "button";
      button.className = "marker-" + m.kind;
      button.dataset.epoch = String(m.epoch);
      button.textContent = m.label;
      button.title = "show this decision's reason below the chart";
      button.addEventListener("click", () => pointAt(indexOfEpoch(m.epoch)));
      li.appendChild(button);
      markerList.appendChild(li);
    }
    if (!data.markers.length) {
      const li = document.createElement("li");
      li.className = "marker muted";
      li.textContent = "none yet";
      markerList.appendChild(li);
    }
  }
  listMarkers();

  window.addEventListener("resize", () => chart.setSize({ width: Math.max(320, box.clientWidth - 14), height: HEIGHT }));

  // --- live ------------------------------------------------------------------------
  const runId = data.run_id;
  const base = "/runs/" + encodeURIComponent(runId);
  let timer = null, last = 0;
  const EVERY_MS = 500;

  function setText(id, value) {
    const el = document.getElementById(id);
    if (el) el.textContent = String(value);
  }

  async function refresh() {
    timer = null;
    last = Date.now();
    const [fresh, table] = await Promise.all([
      TC.getJSON(base + "/data.json"),
      fetch(base + "/decisions" + window.location.search, { headers: { "Accept": "text/html" } })
        .then((r) => (r.ok ? r.text() : Promise.reject(new Error(r.status + " " + r.statusText)))),
    ]);
    data = fresh;
    chart.setData(columns(data));
    listMarkers();
    if (current != null) say(Math.min(current, data.epochs.length - 1));
    setText("run-epoch", data.summary.last_epoch);
    setText("run-interventions", data.summary.interventions);
    setText("run-rollbacks", data.summary.rollbacks);
    const wrap = document.createElement("template");
    wrap.innerHTML = "<table>" + table + "</table>";
    const body = wrap.content.querySelector("tbody");
    const decisions = document.getElementById("decisions");
    if (body && decisions) decisions.replaceChild(body, decisions.tBodies[0]);
  }

  TC.live(runId, () => {
    if (timer !== null) return;
    timer = setTimeout(() => refresh().catch((e) => TC.flash("could not refresh the run: " + e.message)),
      Math.max(0, last + EVERY_MS - Date.now()));
  });

  window.TCRun = { chart, pointAt, data: () => data };
})();

// The compare page: one curve per run, told apart by colour and dash pattern, the
// legend naming each run (its fold first).
(function () {
  const holder = document.getElementById("compare-chart");
  const source = document.getElementById("compare-data");
  if (!holder || !source || !window.uPlot) return;
  const data = JSON.parse(source.textContent);
  const box = document.getElementById("compare-box");
  const COLORS = ["#0969da", "#bc4c00", "#1a7f37", "#8250df", "#cf222e", "#1b7c83", "#9a6700", "#6e7781",
    "#bf3989", "#0550ae", "#953800", "#116329"];
  const DASHES = [[], [8, 4], [2, 3], [10, 3, 2, 3]];
  const number = (v) => (v == null ? "–" : v.toPrecision(4));
  const series = [{ label: "epoch" }].concat(data.series.map((s, i) => ({
    label: s.label,
    stroke: COLORS[i % COLORS.length],
    dash: DASHES[i % DASHES.length],
    width: 1.8,
    spanGaps: true,
    value: (u, v) => number(v),
  })));
  const chart = new uPlot({
    width: Math.max(320, box.clientWidth - 14),
    height: 360,
    scales: { x: { time: false } },
    axes: [{ label: "epoch" }, { label: data.metric, size: 60 }],
    series: series,
    legend: { live: true },
  }, [data.epochs].concat(data.columns), holder);
  window.addEventListener("resize", () => chart.setSize({ width: Math.max(320, box.clientWidth - 14), height: 360 }));
  window.TCCompare = { chart };
})();
