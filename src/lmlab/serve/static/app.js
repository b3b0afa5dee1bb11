// lmlab serve: the experiment list and one experiment's live runs table and curves.
//
// Data comes from the JSON API next to this file (relative URLs, so a path-prefixing proxy
// works) and is polled with the ETag the server sent: an unchanged store costs one 304.
// Every string from a spec or a run reaches the DOM through textContent (el() below), never
// as HTML; the server's Content-Security-Policy forbids any other script.
"use strict";

(() => {
  // -- DOM ---------------------------------------------------------------------------------

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value == null) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key === "style") Object.assign(node.style, value);
      else if (key === "data") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of [].concat(children)) if (child != null) node.append(child);
    return node;
  }

  const $main = document.getElementById("main");
  const $crumb = document.getElementById("crumb");
  const $live = document.getElementById("live");
  const $pause = document.getElementById("pause");

  // -- numbers -----------------------------------------------------------------------------

  // 1500 -> "1.5k", 2e6 -> "2M": tick labels and token counts.
  function si(v) {
    const a = Math.abs(v);
    for (const [scale, suffix] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
      if (a >= scale) return String(+(v / scale).toPrecision(3)) + suffix;
    }
    return String(+v.toPrecision(4));
  }

  function fmt(v, unit) {
    if (v == null) return "—";
    if (unit === "bytes") return v.toFixed(1) + " MiB"; // drawn in MiB (panelSeries)
    if (unit === "integer") return Math.round(v).toLocaleString("en-US");
    if (v === 0) return "0";
    return Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : String(+v.toPrecision(4));
  }

  function fmtX(v, key) {
    if (key === "wall_s") return v < 120 ? v.toFixed(1) + " s" : (v / 60).toFixed(1) + " min";
    if (key === "tokens") return si(v) + " tokens";
    return "step " + Math.round(v).toLocaleString("en-US");
  }

  const axisX = (key) => (u, splits) => splits.map((v) =>
    v == null ? "" : key === "wall_s" ? (v < 120 ? v + "s" : (v / 60).toFixed(1) + "m") : si(v));
  const axisY = (unit) => (u, splits) => splits.map((v) =>
    v == null ? "" : unit === "integer" ? si(v) : String(+v.toPrecision(4)));

  function rgba(hex, alpha) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
  }

  function ago(epochSeconds) {
    if (epochSeconds == null) return "—";
    const s = Math.max(0, Date.now() / 1000 - epochSeconds);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return new Date(epochSeconds * 1000).toLocaleDateString();
  }

  // -- state and routing -------------------------------------------------------------------

  const state = {
    route: { view: "list" },
    etag: null,
    timer: null,
    seq: 0,
    refreshS: 2,
    paused: false,
    data: null,
    // experiment view settings (also in the URL, so a reload or a shared link keeps them)
    x: null,
    mode: "seeds",
    points: 1500,
    hidden: new Set(),
    logY: new Set(),
    xRange: null,
    charts: [],
    renders: 0,
  };

  function parseHash() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    const params = new URLSearchParams(query || "");
    if (path.startsWith("/e/")) {
      return { view: "experiment", key: decodeURIComponent(path.slice(3)), params };
    }
    return { view: "list", params };
  }

  function experimentHash(key, settings = {}) {
    const params = new URLSearchParams();
    if (settings.x) params.set("x", settings.x);
    if (settings.mode && settings.mode !== "seeds") params.set("mode", settings.mode);
    const q = params.toString();
    return `#/e/${encodeURIComponent(key)}${q ? "?" + q : ""}`;
  }

  function syncHash() {
    if (state.route.view !== "experiment") return;
    const want = experimentHash(state.route.key, { x: state.x, mode: state.mode });
    if (location.hash !== want) history.replaceState(null, "", want);
  }

  function onRoute() {
    const route = parseHash();
    const same = route.view === state.route.view && route.key === state.route.key;
    if (!same) {
      destroyCharts();
      state.data = null;
      state.hidden = new Set();
      state.xRange = null;
      $main.replaceChildren();
    }
    state.route = route;
    if (route.view === "experiment") {
      state.x = route.params.get("x") || null;
      state.mode = route.params.get("mode") === "band" ? "band" : "seeds";
    }
    state.etag = null;
    poll();
  }

  // -- polling -----------------------------------------------------------------------------

  function apiUrl() {
    if (state.route.view === "list") return "api/experiments";
    const params = new URLSearchParams({ key: state.route.key, points: String(state.points) });
    if (state.x) params.set("x", state.x);
    return `api/experiment?${params}`;
  }

  function setLive(kind, text) {
    $live.className = "live " + kind;
    $live.textContent = text;
  }

  async function poll() {
    clearTimeout(state.timer);
    // Only the latest poll's answer counts: a change of route or x-axis starts a new one while
    // an older one may still be in flight.
    const seq = ++state.seq;
    if (!state.paused && !document.hidden) {
      try {
        const headers = state.etag ? { "If-None-Match": state.etag } : {};
        const response = await fetch(apiUrl(), { headers, cache: "no-store" });
        if (seq !== state.seq) return;
        if (response.status === 304) {
          markFresh();
        } else if (!response.ok) {
          const body = await response.json().catch(() => ({}));
          showError(body.error || `the server answered ${response.status}`);
          setLive("off", "error; retrying");
        } else {
          state.etag = response.headers.get("ETag");
          const data = await response.json();
          if (seq !== state.seq) return;
          state.refreshS = data.refresh_s || state.refreshS;
          if (state.route.view === "list") renderList(data);
          else renderExperiment(data);
          markFresh();
        }
      } catch (err) {
        if (seq !== state.seq) return;
        setLive("off", "server not reachable; retrying");
      }
    }
    state.timer = setTimeout(poll, state.refreshS * 1000);
  }

  function markFresh() {
    if (state.paused) return;
    const running = state.route.view === "list"
      ? (state.list || []).some((e) => e.statuses.running)
      : state.data && state.data.statuses.running;
    const time = new Date().toLocaleTimeString();
    setLive(running ? "on" : "idle", `${running ? "live" : "no run writing"} · checked ${time}`);
  }

  function showError(message) {
    let box = document.getElementById("error");
    if (!box) {
      box = el("p", { id: "error", class: "error" });
      $main.prepend(box);
    }
    box.textContent = message;
  }

  function clearError() {
    const box = document.getElementById("error");
    if (box) box.remove();
  }

  $pause.addEventListener("click", () => {
    state.paused = !state.paused;
    $pause.textContent = state.paused ? "resume" : "pause";
    $pause.classList.toggle("on", state.paused);
    if (state.paused) setLive("idle", "paused");
    else poll();
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  window.addEventListener("hashchange", onRoute);

  // -- the experiment list -----------------------------------------------------------------

  function statusChips(statuses) {
    return Object.entries(statuses).map(([status, n]) =>
      el("span", { class: `chip status-${status}`, text: `${n} ${status}` }));
  }

  function renderList(data) {
    state.list = data.experiments;
    $crumb.textContent = data.root;
    clearError();
    const view = el("div", { id: "list" });
    view.append(el("h1", { text: "Experiments" }),
      el("p", { class: "muted", text: `under ${data.root}` }));
    if (!data.experiments.length) {
      view.append(el("div", { class: "empty" }, [
        "No experiments here yet. This page refreshes on its own: start one with ",
        el("code", { text: `lmlab run SPEC --out ${data.root}/NAME` }), "."]));
    } else {
      const rows = data.experiments.map((e) => el("tr", { data: { key: e.key } }, [
        el("td", {}, el("a", { href: experimentHash(e.key), text: e.name })),
        el("td", { class: "muted", text: e.key }),
        el("td", { text: e.category || "—" }),
        el("td", { class: "wrap", text: e.error ? `unreadable: ${e.error}` : e.objective || "—" }),
        el("td", { text: e.axis || "—" }),
        el("td", {}, e.n_runs ? statusChips(e.statuses) : el("span", { class: "muted", text: "no runs" })),
        el("td", { class: "muted", text: ago(e.updated) }),
      ]));
      view.append(el("div", { class: "table-wrap" }, el("table", {}, [
        el("thead", {}, el("tr", {}, ["Experiment", "Folder", "Category", "Question", "Axis",
          "Runs", "Last write"].map((h) => el("th", { text: h })))),
        el("tbody", {}, rows)])));
    }
    $main.replaceChildren(view);
  }

  // -- one experiment ----------------------------------------------------------------------

  function renderExperiment(data) {
    const first = state.data === null;
    state.data = data;
    if (state.x === null) state.x = data.x_key;
    $crumb.textContent = data.path;
    document.title = `${data.name} · lmlab`;
    if (first) buildExperimentView(data);
    document.getElementById("x-axis").value = state.x;
    markModes();
    clearError();
    renderHeader(data);
    renderLegend(data);
    renderPanels(data);
    renderRuns(data);
    state.renders += 1;
    document.body.dataset.renders = String(state.renders);
  }

  function buildExperimentView(data) {
    const controls = el("div", { class: "controls" });
    const xSelect = el("select", { id: "x-axis", onchange: (e) => {
      state.x = e.target.value; state.xRange = null; state.etag = null; syncHash(); poll();
    } }, data.x_axes.map((a) => el("option", { value: a.key,
      text: a.label + (a.key === data.comparison_x ? " (comparison axis)" : "") })));
    xSelect.value = state.x;
    const modes = el("span", { class: "group", id: "mode" }, [
      ["seeds", "per seed"], ["band", "mean ± band"]].map(([mode, label]) =>
      el("button", { type: "button", data: { mode }, text: label, onclick: () => {
        state.mode = mode; syncHash(); renderPanels(state.data); markModes();
      } })));
    const points = el("select", { id: "points", onchange: (e) => {
      state.points = +e.target.value; state.etag = null; poll();
    } }, [[1500, "1.5k points"], [5000, "5k points"], [20000, "20k points"]].map(([v, t]) =>
      el("option", { value: String(v), text: t })));
    points.value = String(state.points);
    controls.append(el("label", { text: "x-axis" }), xSelect, el("label", { text: "curves" }), modes,
      el("button", { type: "button", id: "reset-zoom", text: "reset zoom", onclick: () => setZoom(null) }),
      el("label", { text: "detail" }), points,
      el("span", { class: "hint", text: "drag on a chart to zoom, double-click to reset; click an arm to hide it" }));
    $main.replaceChildren(
      el("section", { id: "head" }),
      controls,
      el("div", { class: "legend", id: "legend" }),
      el("div", { class: "panels", id: "panels" }),
      el("h2", { text: "Runs" }),
      el("div", { class: "table-wrap" }, el("table", { id: "runs" })));
    markModes();
  }

  function markModes() {
    for (const b of document.querySelectorAll("#mode button")) {
      b.classList.toggle("on", b.dataset.mode === state.mode);
    }
  }

  function renderHeader(data) {
    const facts = [data.category, `comparison axis ${data.axis}`,
      `${data.runs.length} runs`, data.preflight == null ? null
        : `preflight ${data.preflight ? "passed" : "FAILED"}`].filter(Boolean).join(" · ");
    document.getElementById("head").replaceChildren(
      el("h1", { text: data.name }),
      el("div", { class: "muted", text: facts }),
      data.objective ? el("p", { class: "question", text: data.objective }) : null,
      data.prediction ? el("p", { class: "muted", text: `Prediction: ${data.prediction}` }) : null,
      el("div", {}, statusChips(data.statuses)));
  }

  function renderLegend(data) {
    // Rebuilt only when it changes: a click on an arm must not land on a replaced element.
    const key = JSON.stringify([data.arms, data.reference, [...state.hidden]]);
    const host = document.getElementById("legend");
    if (host.dataset.key === key) return;
    host.dataset.key = key;
    const items = data.arms.map((arm) => {
      const values = Object.entries(arm.values).map(([k, v]) => `${k} = ${v}`).join(", ");
      return el("span", {
        class: "arm" + (state.hidden.has(arm.name) ? " hidden" : ""), data: { arm: arm.name },
        title: "click to hide or show", onclick: () => {
          if (state.hidden.has(arm.name)) state.hidden.delete(arm.name); else state.hidden.add(arm.name);
          renderLegend(state.data); renderPanels(state.data);
        } }, [el("span", { class: "swatch", style: { background: arm.color } }),
        el("span", { class: "name", text: arm.name }),
        arm.name === data.reference ? el("span", { class: "values", text: "(reference)" }) : null,
        values ? el("span", { class: "values", text: values }) : null]);
    });
    host.replaceChildren(...items);
  }

  // -- charts ------------------------------------------------------------------------------

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

  function renderPanels(data) {
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
  function setZoom(range) {
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

  function destroyCharts() {
    for (const c of state.charts) if (c.u) c.u.destroy();
    state.charts = [];
  }

  new ResizeObserver(() => {
    for (const c of state.charts) if (c.u) c.u.setSize({ width: chartWidth(c), height: 250 });
  }).observe($main);

  // -- the runs table ----------------------------------------------------------------------

  const RUN_COLUMNS = [
    ["run", "Run"], ["status", "Status"], ["progress", "Progress"],
    ["steps", "Steps"], ["tokens", "Tokens"], ["train_loss", "Train loss"],
    ["val_loss", "Last val loss"], ["final_val_loss", "Final val loss"],
    ["final_val_ppl", "Final ppl"], ["tokens_per_s", "Tokens/s"], ["peak_mem", "Peak memory"],
    ["wall", "Wall"], ["events", "Events"],
  ];

  function renderRuns(data) {
    const head = el("tr", {}, RUN_COLUMNS.map(([key, label]) => el("th", {
      text: key === "peak_mem" && data.memory_label ? data.memory_label : label })));
    const rows = data.runs.map((run) => el("tr", { data: { run: run.run_id, status: run.status } },
      RUN_COLUMNS.map(([key]) => runCell(run, key))));
    document.getElementById("runs").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  }

  function runCell(run, key) {
    const t = run.text;
    if (key === "run") {
      return el("td", {}, [el("span", { class: "swatch", style: { background: run.color } }),
        el("span", { text: run.run_id }), el("div", { class: "muted", text: run.arm })]);
    }
    if (key === "status") {
      return el("td", { class: `status-${run.status}` }, [t.status,
        run.error ? el("div", { class: "run-error", text: run.error }) : null]);
    }
    if (key === "progress") {
      const p = run.progress == null ? 0 : run.progress;
      return el("td", {}, [el("span", { class: "bar" }, el("span", { style: { width: `${100 * p}%` } })),
        t.progress]);
    }
    if (key === "events") return el("td", { text: t.events });
    return el("td", { class: "num", text: t[key] });
  }

  onRoute();
})();
