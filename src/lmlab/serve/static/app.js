// lmlab serve: the experiment list and one experiment's live runs table and curves.
//
// Data comes from the JSON API next to this file (relative URLs, so a path-prefixing proxy
// works) and is polled with the ETag the server sent: an unchanged store costs one 304.
// Every string from a spec or a run reaches the DOM through textContent (el() in format.js),
// never as HTML; the server's Content-Security-Policy forbids any other script.

import { destroyCharts, renderPanels, setZoom } from "./charts.js";
import { ago, el } from "./format.js";
import { state } from "./state.js";

const $main = document.getElementById("main");
const $crumb = document.getElementById("crumb");
const $live = document.getElementById("live");
const $pause = document.getElementById("pause");

// -- routing ------------------------------------------------------------------------------

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

// The list is updated in place, row by row (keyed by experiment): while runs write it changes
// at every poll, and a link replaced under the pointer would swallow the click.
function renderList(data) {
  state.list = data.experiments;
  $crumb.textContent = data.root;
  clearError();
  let view = document.getElementById("list");
  if (!view) {
    view = el("div", { id: "list" }, [el("h1", { text: "Experiments" }),
      el("p", { class: "muted", id: "list-root" }), el("div", { id: "list-body" })]);
    $main.replaceChildren(view);
  }
  document.getElementById("list-root").textContent = `under ${data.root}`;
  const body = document.getElementById("list-body");
  if (!data.experiments.length) {
    body.replaceChildren(el("div", { class: "empty" }, [
      "No experiments here yet. This page refreshes on its own: start one with ",
      el("code", { text: `lmlab run SPEC --out ${data.root}/NAME` }), "."]));
    return;
  }
  let tbody = body.querySelector("tbody");
  if (!tbody) {
    tbody = el("tbody");
    body.replaceChildren(el("div", { class: "table-wrap" }, el("table", {}, [
      el("thead", {}, el("tr", {}, ["Experiment", "Folder", "Category", "Question", "Axis",
        "Runs", "Last write"].map((h) => el("th", { text: h })))), tbody])));
  }
  const old = new Map([...tbody.children].map((tr) => [tr.dataset.key, tr]));
  const rows = data.experiments.map((e) => {
    const cells = [
      el("td", { class: "muted", text: e.key }),
      el("td", { text: e.category || "—" }),
      el("td", { class: "wrap", text: e.error ? `unreadable: ${e.error}` : e.objective || "—" }),
      el("td", { text: e.axis || "—" }),
      el("td", {}, e.n_runs ? statusChips(e.statuses) : el("span", { class: "muted", text: "no runs" })),
      el("td", { class: "muted", text: ago(e.updated) }),
    ];
    let tr = old.get(e.key);
    if (!tr) {
      tr = el("tr", { data: { key: e.key } }, el("td", {}, el("a", { href: experimentHash(e.key) })));
    }
    tr.querySelector("a").textContent = e.name;
    tr.replaceChildren(tr.firstElementChild, ...cells); // the link's cell stays
    return tr;
  });
  tbody.replaceChildren(...rows); // moves the rows it keeps, in the new order
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
