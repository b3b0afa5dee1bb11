// What the page is showing: the route, the last answer and the experiment view's settings.
// One object, imported by the page and its charts.

export const state = {
  route: { view: "list" },
  etag: null,
  timer: null,
  seq: 0,
  refreshS: 2,
  paused: false,
  data: null, // the experiment shown, as the API last answered
  list: null, // the experiment list, likewise
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
