// Building the DOM and writing numbers: shared by the page (app.js) and its charts (charts.js).
// Every string from a spec or a run reaches the DOM through textContent (el()), never as HTML.

// -- DOM ---------------------------------------------------------------------------------

export function el(tag, props = {}, children = []) {
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
// -- numbers -----------------------------------------------------------------------------

// 1500 -> "1.5k", 2e6 -> "2M": tick labels and token counts.
export function si(v) {
  const a = Math.abs(v);
  for (const [scale, suffix] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (a >= scale) return String(+(v / scale).toPrecision(3)) + suffix;
  }
  return String(+v.toPrecision(4));
}

export function fmt(v, unit) {
  if (v == null) return "—";
  if (unit === "bytes") return v.toFixed(1) + " MiB"; // drawn in MiB (panelSeries)
  if (unit === "integer") return Math.round(v).toLocaleString("en-US");
  if (v === 0) return "0";
  return Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : String(+v.toPrecision(4));
}

export function fmtX(v, key) {
  if (key === "wall_s") return v < 120 ? v.toFixed(1) + " s" : (v / 60).toFixed(1) + " min";
  if (key === "tokens") return si(v) + " tokens";
  return "step " + Math.round(v).toLocaleString("en-US");
}

export const axisX = (key) => (u, splits) => splits.map((v) =>
  v == null ? "" : key === "wall_s" ? (v < 120 ? v + "s" : (v / 60).toFixed(1) + "m") : si(v));
export const axisY = (unit) => (u, splits) => splits.map((v) =>
  v == null ? "" : unit === "integer" ? si(v) : String(+v.toPrecision(4)));

export function rgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

export function ago(epochSeconds) {
  if (epochSeconds == null) return "—";
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return new Date(epochSeconds * 1000).toLocaleDateString();
}
