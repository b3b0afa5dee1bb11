// The experiment page's charts (uPlot, loaded before this module as the global `uPlot`): one
// panel per metric, per seed or mean with band, a zoom shared by every panel, a tooltip, and
// stability events marked where they happened.

import { axisX, axisY, el, fmt, fmtX, rgba } from "./format.js";
import { state } from "./state.js";

// The series one panel draws in the current mode: uPlot wants one x column for all, so each
// run's (or arm's) own [x, y...] table is joined on x (missing values become undefined, which
// uPlot skips without breaking the line; a logged NaN stays null, a gap).
function panelSeries(data, panel) {
  const log = state.logY.has(panel.metric);
  // Memory is drawn in MiB, so that the axis ticks are round numbers of the unit it reads in.
  const scale = panel.unit === "bytes" ? 1 / 1048576 : 1;
  const clean = (ys) => ys.map((v) => (v == null || (log && v <= 0) ? null : v * scale));
  const tables = [];
  const series = [];
  const bands = [];
  const visible = (arm) => !state.hidden.has(arm);
  const seedLine = (run, dashed) => {
    const xy = panel.runs[run.run_id];
    if (!xy || !visible(run.arm)) return;
    tables.push([xy[0], clean(xy[1])]);
    series.push({ label: run.run_id, stroke: run.color, width: dashed ? 1 : 1.3,
      dash: dashed ? [5, 4] : undefined, diverged: run.status === "diverged" });
  };
  if (state.mode === "seeds") {
    for (const run of data.runs) seedLine(run, run.status === "diverged");
  } else {
    for (const arm of data.arms) {
      const b = panel.arms[arm.name];
      if (!b || !visible(arm.name)) continue;
      const [x, mean, low, high] = b.data;
      tables.push([x, clean(mean), clean(low), clean(high)]);
      const at = series.length + 1; // uPlot series 0 is x
      series.push({ label: `${arm.name} (mean of ${b.n_seeds})`, stroke: arm.color, width: 2 },
        { label: `${arm.name} min`, stroke: rgba(arm.color, 0), width: 0, band: true },
        { label: `${arm.name} max`, stroke: rgba(arm.color, 0), width: 0, band: true });
      if (b.n_seeds > 1) bands.push({ series: [at + 2, at + 1], fill: rgba(arm.color, 0.18) });
    }
    // As in the report: diverged seeds on their own, dashed, never in an arm's mean.
    for (const run of data.runs) if (run.status === "diverged") seedLine(run, true);
  }
  const joined = tables.length ? uPlot.join(tables) : [[]];
  return { data: joined, series, bands };
}

function structureKey(panel, built) {
  return JSON.stringify([state.mode, state.x, state.logY.has(panel.metric),
    built.series.map((s) => s.label), built.bands.length]);
}

function countPoints(built) {
  let n = 0;
  built.series.forEach((s, i) => {
    if (s.band) return;
    for (const v of built.data[i + 1] || []) if (v != null) n += 1;
  });
  return n;
}

export function renderPanels(data) {
  const host = document.getElementById("panels");
  if (!data.panels.length) {
    destroyCharts();
    host.replaceChildren(el("div", { class: "empty", text: "No curves yet: the runs have not logged a step." }));
    return;
  }
  const wanted = data.panels.map((p) => p.metric);
  if (state.charts.map((c) => c.metric).join() !== wanted.join()) {
    destroyCharts();
    host.replaceChildren();
    for (const panel of data.panels) state.charts.push(makePanel(host, panel));
  }
  data.panels.forEach((panel, i) => updateChart(state.charts[i], panel, data));
}

function makePanel(host, panel) {
  const chartEl = el("div", { class: "chart" });
  const logButton = el("button", { type: "button", text: "log y", onclick: () => {
    if (state.logY.has(panel.metric)) state.logY.delete(panel.metric); else state.logY.add(panel.metric);
    logButton.classList.toggle("on", state.logY.has(panel.metric));
    renderPanels(state.data);
  } });
  logButton.classList.toggle("on", state.logY.has(panel.metric));
  const box = el("div", { class: "panel", data: { metric: panel.metric } }, [
    el("div", { class: "panel-head" }, [el("h3", { text: panel.title }),
      el("span", { class: "sub", text: panel.ylabel }), logButton]),
    chartEl]);
  host.append(box);
  return { metric: panel.metric, box, chartEl, u: null, key: null };
}

function updateChart(chart, panel, data) {
  const built = panelSeries(data, panel);
  const key = structureKey(panel, built);
  chart.built = built;
  chart.events = panel.metric === "train_loss" ? instabilityEvents(data) : [];
  if (chart.u && chart.key === key) {
    chart.u.setData(built.data, true);
    if (state.xRange) chart.u.setScale("x", { min: state.xRange[0], max: state.xRange[1] });
  } else {
    if (chart.u) chart.u.destroy();
    chart.u = new uPlot(chartOptions(chart, panel, built, data), built.data, chart.chartEl);
    chart.key = key;
    if (state.xRange) chart.u.setScale("x", { min: state.xRange[0], max: state.xRange[1] });
  }
  chart.box.dataset.zoom = zoomText();
  chart.box.dataset.points = String(countPoints(built));
  chart.box.dataset.series = String(built.series.filter((s) => !s.band).length);
}

function chartWidth(chart) {
  return Math.max(300, chart.chartEl.clientWidth || chart.box.clientWidth - 20);
}

function chartOptions(chart, panel, built, data) {
  const xKey = data.x_key;
  return {
    width: chartWidth(chart),
    height: 250,
    legend: { show: false },
    scales: { x: { time: false }, y: state.logY.has(panel.metric) ? { distr: 3 }
      : FOCUSED.has(panel.metric) ? { range: (u) => focusRange(chart, u) } : {} },
    series: [{ label: data.x_label }, ...built.series.map((s) => ({
      label: s.label, stroke: s.stroke, width: s.width, dash: s.dash, spanGaps: false,
      points: { show: false } }))],
    bands: built.bands,
    axes: [
      { label: data.x_label, values: axisX(xKey), size: 40, labelSize: 18 },
      { values: axisY(panel.unit), size: 58 },
    ],
    cursor: {
      sync: { key: "lmlab", setSeries: false },
      drag: { x: true, y: false, setScale: false },
      points: { show: false },
    },
    hooks: {
      ready: [(u) => {
        u.over.addEventListener("dblclick", () => setZoom(null));
        chart.tip = el("div", { class: "tip" });
        u.over.append(chart.tip);
      }],
      setSelect: [(u) => {
        if (u.select.width > 4) {
          const min = u.posToVal(u.select.left, "x");
          const max = u.posToVal(u.select.left + u.select.width, "x");
          setZoom([min, max]);
        }
        u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
      }],
      setCursor: [(u) => showTip(chart, u, panel, xKey)],
      draw: [(u) => drawEvents(chart, u, xKey)],
    },
  };
}

// Loss curves fall steeply at first; as the report does, the y-range leaves out the first 10%
// of the x-range (unless zoomed) and the seeds that diverged, so the part where arms differ
// is readable. What is cut off is still drawn, off the edge.
const FOCUSED = new Set(["train_loss", "val_loss"]);

function focusRange(chart, u) {
  // Called while the x-scale is being set: the zoom is state.xRange, not u.scales.x yet.
  const xs = u.data[0];
  const [xmin, xmax] = state.xRange || [xs[0], xs[xs.length - 1]];
  const from = state.xRange ? xmin : xmin + 0.1 * (xmax - xmin);
  const extent = (skipDiverged) => {
    let lo = Infinity, hi = -Infinity;
    chart.built.series.forEach((s, j) => {
      if (skipDiverged && s.diverged) return;
      const ys = u.data[j + 1];
      for (let i = 0; i < xs.length; i++) {
        const v = ys[i];
        if (v == null || xs[i] < from || xs[i] > xmax) continue;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    });
    return [lo, hi];
  };
  let [lo, hi] = extent(true);
  if (!isFinite(lo)) [lo, hi] = extent(false); // only diverged seeds are shown
  if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
  const pad = hi > lo ? 0.06 * (hi - lo) : 0.05 * Math.abs(hi) + 1e-6;
  return [lo - pad, hi + pad];
}

// One zoom for every panel (they share the x-axis); also written on each panel's
// data-zoom, which is how the tests see it.
export function setZoom(range) {
  state.xRange = range;
  for (const c of state.charts) {
    if (!c.u) continue;
    if (range) c.u.setScale("x", { min: range[0], max: range[1] });
    else c.u.setData(c.u.data, true);
    c.box.dataset.zoom = zoomText();
  }
}

const zoomText = () => state.xRange ? state.xRange.map((v) => +v.toPrecision(6)).join(",") : "";

function showTip(chart, u, panel, xKey) {
  const tip = chart.tip;
  if (!tip) return;
  const i = u.cursor.idx;
  if (i == null || u.cursor.left < 0) { tip.style.display = "none"; return; }
  const rows = [];
  chart.built.series.forEach((s, j) => {
    const v = u.data[j + 1][i];
    if (s.band || v == null) return;
    rows.push(el("div", {}, [el("span", { class: "swatch", style: { background: s.stroke } }),
      `${s.label}: ${fmt(v, panel.unit)}`]));
  });
  if (!rows.length) { tip.style.display = "none"; return; }
  tip.replaceChildren(el("div", { class: "x", text: fmtX(u.data[0][i], xKey) }), ...rows);
  tip.style.display = "block";
  const left = u.cursor.left + 14;
  tip.style.left = (left + 220 > u.over.clientWidth ? Math.max(0, u.cursor.left - 230) : left) + "px";
  tip.style.top = Math.max(0, u.cursor.top - 10) + "px";
}

// Stability events on the train-loss panel, as the report marks them: at the loss the
// event recorded, or pinned to the top edge when that is off the chart (a blow-up, a NaN).
function instabilityEvents(data) {
  const out = [];
  for (const run of data.runs) {
    if (state.hidden.has(run.arm)) continue;
    for (const e of run.instability) out.push({ ...e, color: run.color, run: run.run_id });
  }
  return out;
}

const MARKS = { spike: "▲", divergence: "✕", nan: "★" };

function drawEvents(chart, u, xKey) {
  if (!chart.events || !chart.events.length) return;
  const ctx = u.ctx;
  const { left, top, width, height } = u.bbox;
  ctx.save();
  ctx.font = `${Math.round(13 * devicePixelRatio)}px system-ui, sans-serif`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  for (const e of chart.events) {
    const x = u.valToPos(e[xKey], "x", true);
    if (!(x >= left && x <= left + width)) continue;
    let y = e.loss == null ? top : u.valToPos(e.loss, "y", true);
    y = Math.min(Math.max(y, top + 6), top + height - 6);
    ctx.fillStyle = e.color;
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 0.6 * devicePixelRatio;
    ctx.strokeText(MARKS[e.kind] || "●", x, y);
    ctx.fillText(MARKS[e.kind] || "●", x, y);
  }
  ctx.restore();
}

export function destroyCharts() {
  for (const c of state.charts) if (c.u) c.u.destroy();
  state.charts = [];
}

new ResizeObserver(() => {
  for (const c of state.charts) if (c.u) c.u.setSize({ width: chartWidth(c), height: 250 });
}).observe(document.getElementById("main"));
