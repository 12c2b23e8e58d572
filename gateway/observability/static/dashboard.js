/* The drift dashboard's drawing: asks /v1/deployments/{deployment}/drift every 5 s and redraws
   the charts as SVG. Nothing is fetched from elsewhere and nothing is built. Colours are the
   Okabe-Ito palette, which stays distinguishable for colour-blind readers; thresholds are dashed
   so they differ from the data by shape too. */
"use strict";
/* The page is served for /dashboard/{deployment}; the server validated the name. It only ever
   reaches the page as textContent and, encoded, in the report's URL. */
const DEPLOYMENT = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
const SOURCE = "/v1/deployments/" + encodeURIComponent(DEPLOYMENT) + "/drift";
const REFRESH_MS = 5000, H = 260, M = {l: 50, r: 16, t: 24, b: 40};
const C = {blue: "#0072B2", orange: "#E69F00", green: "#009E73", verm: "#D55E00",
           sky: "#56B4E9", purple: "#CC79A7", grey: "#8C8C8C"};
const KINDS = {divergence_mean: "divergence", disagreement_rate: "disagreement",
               score_psi: "score PSI", score_js: "score JS", feature_psi: "feature PSI",
               class_psi: "class PSI", class_js: "class JS"};
const CLASS_KINDS = new Set(["class_psi", "class_js"]);  // a multiclass model's only
const NS = "http://www.w3.org/2000/svg";
let lastDoc = null;
document.title = "Drift \u00b7 " + DEPLOYMENT;

const $ = id => document.getElementById(id);
const isNum = v => typeof v === "number" && isFinite(v);
function el(name, attrs, parent) {  // an SVG element; text only ever goes in as textContent
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return parent ? parent.appendChild(e) : e;
}
function label(parent, x, y, s, anchor, cls) {
  const t = el("text", Object.assign({x: x, y: y, "text-anchor": anchor || "middle"},
                                     cls ? {class: cls} : {}), parent);
  t.textContent = s;
  return t;
}
function tip(shape, s) { el("title", {}, shape).textContent = s; return shape; }
function node(tag, text, cls) {
  const e = Object.assign(document.createElement(tag), cls ? {className: cls} : {});
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v) {
  if (!isNum(v)) return "\u2013";
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toFixed(3);
}
const pct = v => isNum(v) ? (v * 100).toFixed(v < 0.1 ? 1 : 0) + "%" : "\u2013";
const clock = ms => isNum(ms) ? new Date(ms).toTimeString().slice(0, 8) : "\u2013";
function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 90 ? s + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago"
       : Math.round(s / 3600) + " h ago";
}
function ticks(lo, hi, n) {
  const raw = (hi - lo || 1) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || 10 * mag;
  const out = [];
  for (let i = Math.ceil(lo / step - 1e-9); i * step <= hi + step * 1e-9; i++) out.push(i * step);
  return out.map(v => +v.toPrecision(12));
}
const TIME_STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600];
function timeTicks(t0, t1, n) {
  const step = 1000 * (TIME_STEPS_S.find(s => (t1 - t0) / (1000 * s) <= n) || 86400);
  const out = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) out.push(t);
  return out;
}
/* The axis top: the data, and the thresholds near enough to it to be worth the space. */
function scaleMax(dataMax, limits, anchorSmallest) {
  const base = anchorSmallest && limits.length ? Math.max(dataMax, Math.min(...limits)) : dataMax;
  const near = limits.filter(v => v <= 4 * base);
  return (Math.max(dataMax, ...near) || 1) * 1.12;
}
function frame(svg) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const w = Math.max(320, Math.round(svg.getBoundingClientRect().width || 640));
  svg.setAttribute("viewBox", "0 0 " + w + " " + H);
  svg.removeAttribute("data-points");
  return {w: w, x0: M.l, x1: w - M.r, y0: H - M.b, y1: M.t};
}
function yAxis(svg, g, ymax, y, format) {
  for (const v of ticks(0, ymax, 5)) {
    el("line", {x1: g.x0, x2: g.x1, y1: y(v), y2: y(v), stroke: "#e8ecf1"}, svg);
    label(svg, g.x0 - 6, y(v) + 4, (format || fmt)(v), "end");
  }
  el("line", {x1: g.x0, x2: g.x1, y1: g.y0, y2: g.y0, stroke: "#aab3bf"}, svg);
}
function legend(id, items) {  // styles set through CSSOM, which the CSP allows
  $(id).replaceChildren(...items.map(it => {
    const swatch = node("i", undefined, it.box ? "box" : ""), span = node("span");
    if (it.plain) { span.append(it.label); return span; }
    if (it.box) swatch.style.background = it.color;
    else swatch.style.borderTop = "3px " + (it.dashed ? "dashed " : "solid ") + it.color;
    span.append(swatch, it.label);
    return span;
  }));
}
function waitFor(svg, g, message) { label(svg, g.w / 2, H / 2, message, "middle", "empty"); }
function thresholdLines(svg, g, lines, vertical, scale, max) {
  const off = [], labels = [], names = el("g", {});
  for (const t of lines) {
    if (t.value > max) { off.push(t.label + " threshold " + fmt(t.value)); continue; }
    const p = scale(t.value);
    const at = vertical ? {x1: p, x2: p, y1: g.y1, y2: g.y0} : {x1: g.x0, x2: g.x1, y1: p, y2: p};
    el("line", Object.assign(at, {stroke: t.color, "stroke-dasharray": "7 4",
      "stroke-width": 1.6, "data-threshold": t.key}), svg);
    if (vertical) label(svg, p, g.y1 - 6, "threshold " + fmt(t.value), "middle", "th");
    else labels.push({y: p - 4, text: t.label + " " + fmt(t.value)});
  }
  labels.sort((a, b) => a.y - b.y);  // top down, each at least a line below the one above
  labels.forEach((l, i) => {
    if (i && l.y < labels[i - 1].y + 12) l.y = labels[i - 1].y + 12;
    label(names, g.x1 - 2, l.y, l.text, "end", "th");
  });
  if (off.length) label(names, g.x1, 12, "off scale: " + off.join(", "), "end");
  svg.appendChild(names);
  return names;  // to be raised above the data drawn later
}

/* A history point evaluated on fewer requests than the thresholds ask: drawn, but hollow. */
function unjudged(p) { return typeof p.status === "string" && p.status !== "ok"; }

/* Lines over time from the history; thresholds dashed; a null value breaks its line. */
function lineChart(svg, legendId, hist, series, limits, waiting, note) {
  const g = frame(svg);
  const lines = limits.filter(t => isNum(t.value));
  const pts = hist.filter(p => p && isNum(p.ts_ms));
  legend(legendId, series.map(s => ({label: s.label, color: s.color})).concat(
    lines.map(t => ({label: t.label + " threshold", color: t.color, dashed: true})),
    pts.some(unjudged) ? [{label: "\u25CB not judged (too few requests)", plain: true}] : []));
  const shown = series.filter(s => pts.some(p => isNum(p[s.key])));
  if (!shown.length) { waitFor(svg, g, waiting); return; }
  let t0 = pts[0].ts_ms;
  const t1 = pts[pts.length - 1].ts_ms;
  if (t1 - t0 < 5000) t0 = t1 - 5000;
  let dataMax = 0;
  for (const s of shown) {
    for (const p of pts) if (isNum(p[s.key])) dataMax = Math.max(dataMax, p[s.key]);
  }
  const ymax = scaleMax(dataMax, lines.map(t => t.value), true);
  const x = t => g.x0 + (t - t0) / (t1 - t0) * (g.x1 - g.x0);
  const y = v => g.y0 - Math.min(v, ymax) / ymax * (g.y0 - g.y1);
  yAxis(svg, g, ymax, y);
  for (const t of timeTicks(t0, t1, Math.max(2, Math.floor((g.x1 - g.x0) / 80)))) {
    el("line", {x1: x(t), x2: x(t), y1: g.y0, y2: g.y0 + 4, stroke: "#aab3bf"}, svg);
    label(svg, x(t), g.y0 + 16, clock(t));
  }
  label(svg, (g.x0 + g.x1) / 2, H - 4, "time of evaluation");
  const names = thresholdLines(svg, g, lines, false, y, ymax);
  let n = 0;
  for (const s of shown) {
    let d = "", pen = "M";
    const drawn = [];
    for (const p of pts) {
      const v = p[s.key];
      if (!isNum(v)) { pen = "M"; continue; }
      d += pen + x(p.ts_ms).toFixed(1) + " " + y(v).toFixed(1) + " ";
      pen = "L";
      drawn.push(p);
    }
    n += drawn.length;
    el("path", {d: d, fill: "none", stroke: s.color, "stroke-width": s.width || 2.2,
                "stroke-linejoin": "round", "data-series": s.key}, svg);
    const dots = drawn.length <= 60;  // every point while they fit, else the latest
    for (const p of dots ? drawn : drawn.slice(-1)) {
      const at = {cx: x(p.ts_ms), cy: y(p[s.key]), r: dots ? 2.6 : 3.5, fill: s.color};
      let says = s.label + " " + fmt(p[s.key]) + " at " + clock(p.ts_ms);
      if (unjudged(p)) {
        Object.assign(at, {fill: "#fff", stroke: s.color, "stroke-width": 1.4,
                           "data-judged": "false"});
        says += " (not judged: " + (isNum(p.requests) ? p.requests : "too few") + " requests)";
      }
      tip(el("circle", at, svg), says);
    }
  }
  svg.appendChild(names);
  if (note) label(svg, g.x0, 12, note, "start");
  svg.setAttribute("data-points", String(n));
}

/* Grouped bars: the share of requests in each score bin, per distribution. */
function scoreChart(svg, cur, waiting) {
  const g = frame(svg), score = cur && cur.score;
  const groups = [["real", "real" + (cur && cur.real_model ? " " + cur.real_model : ""), C.blue],
    ["canary", "canary" + (cur && cur.canary_model ? " " + cur.canary_model : ""), C.orange],
    ["reference", "reference" + (score && score.reference_source ? " (" +
      score.reference_source + ")" : ""), C.grey]]
    .filter(k => score && Array.isArray(score[k[0]]) && score[k[0]].some(isNum));
  legend("legend-scores", groups.map(k => ({label: k[1], color: k[2], box: true})));
  const edges = score && Array.isArray(score.edges) ? score.edges.filter(isNum) : [];
  if (!groups.length || edges.length < 2) { waitFor(svg, g, waiting); return; }
  const bins = edges.length - 1;
  let top = 0;
  for (const k of groups) for (const v of score[k[0]]) if (isNum(v)) top = Math.max(top, v);
  const ymax = (top || 1) * 1.12, bw = (g.x1 - g.x0) / bins, gw = bw * 0.84 / groups.length;
  const y = v => g.y0 - v / ymax * (g.y0 - g.y1);
  yAxis(svg, g, ymax, y, v => +(v * 100).toFixed(1) + "%");
  const every = bw >= 34 ? 1 : 2;
  edges.forEach((e, i) => {
    if (i % every === 0) label(svg, g.x0 + i * bw, g.y0 + 16, String(+e.toFixed(3)));
  });
  // a multiclass model's score is its top probability (it said "positive class"; a probe)
  label(svg, (g.x0 + g.x1) / 2, H - 4, (cur && cur.classes ? "top class probability"
    : "score of the positive class") + " (share of requests)");
  let n = 0;
  for (let b = 0; b < bins; b++) {
    groups.forEach((k, i) => {
      const v = score[k[0]][b];
      if (!isNum(v)) return;
      tip(el("rect", {x: g.x0 + b * bw + bw * 0.08 + i * gw, y: y(v), width: Math.max(gw - 1.5, 1),
        height: Math.max(g.y0 - y(v), 0), fill: k[2], rx: 1.5, "data-series": k[0]}, svg),
        k[1] + ", score " + edges[b] + "\u2013" + edges[b + 1] + ": " + pct(v));
      n++;
    });
  }
  svg.setAttribute("data-points", String(n));
}

/* Horizontal bars of the most drifted features; red beyond the threshold. */
function featureChart(svg, features, threshold, waiting) {
  const g = frame(svg);
  const top = ((features && features.top) || []).filter(f => f && isNum(f.psi));
  legend("legend-features", [{label: "PSI", color: C.sky, box: true},
    {label: "above threshold", color: C.verm, box: true}].concat(isNum(threshold)
    ? [{label: "threshold", color: C.verm, dashed: true}] : []));
  if (!top.length) { waitFor(svg, g, waiting); return; }
  const longest = Math.max(...top.map(f => String(f.feature).length));
  g.x0 = Math.min(Math.round(g.w * 0.4), Math.max(80, longest * 6.4 + 14));
  g.x1 -= 36;
  const vmax = scaleMax(Math.max(...top.map(f => f.psi)), isNum(threshold) ? [threshold] : [],
                        false);
  const x = v => g.x0 + Math.min(v, vmax) / vmax * (g.x1 - g.x0);
  const bh = (g.y0 - g.y1) / Math.max(top.length, 3);
  for (const v of ticks(0, vmax, 5)) {
    el("line", {x1: x(v), x2: x(v), y1: g.y1, y2: g.y0, stroke: "#e8ecf1"}, svg);
    label(svg, x(v), g.y0 + 16, fmt(v));
  }
  label(svg, (g.x0 + g.x1) / 2, H - 4, "population stability index against training");
  top.forEach((f, i) => {
    const over = isNum(threshold) && f.psi > threshold, mid = g.y1 + i * bh + bh / 2;
    tip(el("rect", {x: g.x0, y: mid - bh * 0.34, width: Math.max(x(f.psi) - g.x0, 1.5),
      height: bh * 0.68, rx: 2, fill: over ? C.verm : C.sky, "data-feature": f.feature}, svg),
      f.feature + ": PSI " + fmt(f.psi));
    // a name longer than the margin holds is cut (the bar's tooltip has it whole): it ran
    // across the neighbouring card
    const room = Math.max(4, Math.floor((g.x0 - 14) / 6.4)), name = String(f.feature);
    tip(label(svg, g.x0 - 6, mid + 4, name.length > room ? name.slice(0, room - 1) + "\u2026"
      : name, "end", "val"), name);
    label(svg, x(f.psi) + 4, mid + 4, fmt(f.psi), "start", "val");
  });
  thresholdLines(svg, g, isNum(threshold)
    ? [{key: "feature_psi", label: "feature PSI", value: threshold, color: C.verm}] : [],
    true, x, vmax);
  svg.setAttribute("data-points", String(top.length));
}

function header(doc, cur, th, win, waiting) {
  $("dep").textContent = doc.deployment || DEPLOYMENT;
  const judged = cur && cur.status === "ok";
  $("status").textContent = !cur ? "not evaluated yet" : judged ? "judging drift" : waiting;
  $("status").className = "pill " + (judged ? "ok" : "wait");
  $("updated").textContent = isNum(doc.evaluated_at_ms)
    ? "evaluated " + clock(doc.evaluated_at_ms) + " (" + ago(doc.evaluated_at_ms) + ")" : "";
  // the window's models, else who holds the role now (an idle window has none)
  const roles = doc.roles && typeof doc.roles === "object" ? doc.roles : null;
  const facts = [["real", (cur && cur.real_model) || (roles && roles.real)],
    ["canary", (cur && cur.canary_model) || (roles && (roles.canary || "none"))],
    ["window", (cur ? cur.requests : 0) + " requests (up to " + (win.requests ?? "?") +
      ", " + (win.seconds ?? "?") + " s)"],
    ["from", cur && isNum(cur.from_ms) && cur.from_ms > 0  // 0: no request in the window
      ? clock(cur.from_ms) + " to " + clock(cur.to_ms) : null],
    ["score reference", cur && cur.score && cur.score.reference_source]];
  $("facts").replaceChildren(...facts.map(f => {
    const d = node("div"); d.append(node("dt", f[0]), node("dd", f[1] ?? "\u2013")); return d;
  }));
  const alerts = Array.isArray(doc.alerts) ? doc.alerts : [];
  $("alerts").replaceChildren(...alerts.map(a => {
    // a feature's alert names it and opens its view; a figure below its threshold (the
    // prediction prior's share under training's) says so
    const feature = typeof a.feature === "string" ? a.feature : null;
    const b = node(feature ? "a" : "span", "\u26a0 " + alertName(a) + " " + fmt(a.value) +
      (isNum(a.value) && isNum(a.threshold) && a.value < a.threshold ? " < " : " > ") +
      fmt(a.threshold) + " \u00b7 since " + clock(a.since_ms) +
      (isNum(a.since_ms) ? " (" + ago(a.since_ms) + ")" : ""), "badge alert");
    if (feature) b.href = "?feature=" + encodeURIComponent(feature);
    b.setAttribute("data-alert", String(a.kind));
    if (typeof a.detail === "string") b.title = a.detail;  // what tripped it, in words
    return b;
  }));
  if (!alerts.length) $("alerts").append(node("span", judged ? "no active drift alert" : "no" +
    " alerts until the window holds " + (th.min_requests ?? "?") + " requests",
    judged ? "badge calm" : "badge wait"));
  const values = (cur && cur.values) || {}, active = new Set(alerts.map(a => a.kind));
  const kinds = Object.keys(KINDS).filter(k => !CLASS_KINDS.has(k) || (cur && cur.classes));
  $("tiles").replaceChildren(...kinds.map(k => {
    const over = active.has(k) || (isNum(values[k]) && isNum(th[k]) && values[k] > th[k]);
    const t = node("div", undefined, "tile" + (over ? " over" : ""));
    t.setAttribute("data-kind", k);
    t.append(node("span", KINDS[k], "muted"), node("b", fmt(values[k])),
             node("span", "threshold " + fmt(th[k]), "muted"));
    return t;
  }));
}

function events(list) {
  const row = (...cells) => { const tr = node("tr"); tr.append(...cells); return tr; };
  const rows = list.slice(-15).reverse().map(e => row(node("td", clock(e.ts_ms)),
    node("td", String(e.type), String(e.type)), node("td", alertName(e)),
    node("td", fmt(e.value)), node("td", fmt(e.threshold))));
  $("events").replaceChildren(...(rows.length ? rows
    : [row(Object.assign(node("td", "no drift event yet", "muted"), {colSpan: 5}))]));
}

function alertName(a) {
  const kind = KINDS[a.kind] || String(a.kind);
  return typeof a.feature === "string" ? kind + " of " + a.feature : kind;
}

function render(doc) {
  const cur = doc.current || null, th = doc.thresholds || {}, win = doc.window || {};
  const have = cur && isNum(cur.requests) ? cur.requests : 0, need = th.min_requests ?? "?";
  const waiting = "waiting for data: " + have + " of " + need + " requests";
  const note = cur && cur.status !== "ok" ? waiting + " (not judged yet)" : "";
  // enough requests and still no divergence: no canary scored them (a deployment without one)
  const noCanary = isNum(need) && have >= need
    ? "no divergence: no canary scored the window's requests" : waiting;
  header(doc, cur, th, win, waiting);
  const hist = Array.isArray(doc.history) ? doc.history : [];
  const chart = name => document.querySelector('svg[data-chart="' + name + '"]');
  lineChart(chart("divergence"), "legend-divergence", hist,
    [{key: "divergence_mean", label: "mean JS distance", color: C.blue},
     {key: "divergence_p90", label: "p90 JS distance", color: C.sky, width: 1.6},
     {key: "disagreement_rate", label: "disagreement rate", color: C.purple}],
    [{key: "divergence_mean", label: "divergence", value: th.divergence_mean, color: C.blue},
     {key: "disagreement_rate", label: "disagreement", value: th.disagreement_rate,
      color: C.purple}], noCanary, note);
  // a multiclass model's class mix, charted only where the history holds it (binary: none)
  const classes = hist.some(p => p && (isNum(p.class_psi) || isNum(p.class_js)));
  lineChart(chart("drift"), "legend-drift", hist,
    [{key: "score_psi", label: "score PSI", color: C.orange},
     {key: "score_js", label: "score JS distance", color: C.green},
     {key: "feature_psi", label: "largest feature PSI", color: C.verm}].concat(classes
      ? [{key: "class_psi", label: "class PSI", color: C.purple},
         {key: "class_js", label: "class JS distance", color: C.sky, width: 1.6}] : []),
    [{key: "score_psi", label: "score PSI", value: th.score_psi, color: C.orange},
     {key: "score_js", label: "score JS", value: th.score_js, color: C.green},
     {key: "feature_psi", label: "feature PSI", value: th.feature_psi, color: C.verm}].concat(
      classes ? [{key: "class_psi", label: "class PSI", value: th.class_psi, color: C.purple},
                 {key: "class_js", label: "class JS", value: th.class_js, color: C.sky}] : []),
    waiting, note);
  scoreChart(chart("scores"), cur, waiting);
  featureChart(chart("features"), cur && cur.features, th.feature_psi, waiting);
  events(Array.isArray(doc.events) ? doc.events : []);
}

function failed(message) {
  $("error").textContent = "cannot load the drift report: " + message;
  $("error").hidden = false;
  document.body.setAttribute("data-status", "error");
  if (lastDoc) {  // keep showing the last good report, saying it is not fresh (it read green)
    $("status").textContent = "not updating";
    $("status").className = "pill wait";
    if (isNum(lastDoc.evaluated_at_ms)) {
      $("updated").textContent = "last evaluated " + clock(lastDoc.evaluated_at_ms) + " (" +
        ago(lastDoc.evaluated_at_ms) + ")";
    }
    return;
  }
  $("dep").textContent = DEPLOYMENT;
  $("status").textContent = "unavailable";
  for (const svg of document.querySelectorAll("svg[data-chart]")) {
    waitFor(svg, frame(svg), "no data: the drift report is unavailable");
  }
}

async function refresh() {
  try {
    const resp = await fetch(SOURCE, {cache: "no-store", headers: {accept: "application/json"}});
    const doc = await resp.json().catch(() => null);
    if (!resp.ok || !doc || typeof doc !== "object") {
      const detail = doc && typeof doc.detail === "string" ? doc.detail : "";
      failed("HTTP " + resp.status + (detail ? ": " + detail : ""));
    } else {
      lastDoc = doc;
      render(doc);
      $("error").hidden = true;
      document.body.setAttribute("data-status", "ok");
    }
  } catch (err) {  // the network, or a bug in drawing: shown on the page and in the console
    console.error(err);
    failed(err && err.message ? err.message : String(err));
  }
  setTimeout(refresh, REFRESH_MS);
}
let resizing = null;  // redraw at the new width once the resizing settles
window.addEventListener("resize", () => { clearTimeout(resizing);
  resizing = setTimeout(() => lastDoc && render(lastDoc), 150); });
refresh();
