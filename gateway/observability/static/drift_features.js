/* The dashboard's feature view: pick a feature, see its live distribution against training
   and its out-of-distribution rate over time. Asks /v1/deployments/{deployment}/drift/features
   every 5 s (and at once when the pick changes); draws with dashboard.js's helpers, which run
   first (both scripts are deferred, in order). A link may preselect a feature:
   /dashboard/{deployment}?feature=mean%20area. */
"use strict";
const FEATURE_SOURCE = SOURCE + "/features";
let featurePick = new URLSearchParams(location.search).get("feature");
let featureDoc = null, featureTimer = null;

const featureSvg = name => document.querySelector('svg[data-feature-chart="' + name + '"]');

function featureOptions(doc) {
  const pick = $("feature-pick"), list = Array.isArray(doc.features) ? doc.features : [];
  const wanted = list.map(f => String(f.feature));
  if (wanted.join("\u001f") !== Array.from(pick.options, o => o.value).join("\u001f")) {
    pick.replaceChildren(...wanted.map(n => Object.assign(node("option", n), {value: n})));
  }
  list.forEach((f, i) => {  // the latest PSI beside each name, to find the drifting ones
    pick.options[i].textContent = f.feature + (isNum(f.psi) ? " \u00b7 PSI " + fmt(f.psi) : "");
  });
  pick.value = String(doc.feature);
}

/* Share of rows per training decile, training against the live window, then the live rows
   outside the training range in a slot of their own. */
function featureDistribution(svg, doc) {
  const g = frame(svg), train = doc.training || {}, live = doc.live;
  const edges = Array.isArray(train.edges) ? train.edges : [];
  const shares = Array.isArray(train.shares) ? train.shares : [];
  const liveShares = live && Array.isArray(live.shares) ? live.shares : null;
  legend("legend-feature-dist", [{label: "training", color: C.grey, box: true}]
    .concat(liveShares ? [{label: "live window", color: C.blue, box: true},
      {label: "live, outside the training range", color: C.verm, box: true}] : []));
  if (edges.length < 2 || shares.length !== edges.length - 1) {
    waitFor(svg, g, "no training statistics for this feature"); return;
  }
  const bins = shares.length, slots = bins + 1.5, outside = live ? live.out_of_range_rate : null;
  const left = slot => g.x0 + (slot < bins ? slot : slot + 0.5) * bw;  // a gap before "outside"
  let top = Math.max(...shares.filter(isNum), isNum(outside) ? outside : 0);
  if (liveShares) top = Math.max(top, ...liveShares.filter(isNum));
  const ymax = (top || 1) * 1.12, bw = (g.x1 - g.x0) / slots, gw = bw * 0.84 / 2;
  const y = v => g.y0 - v / ymax * (g.y0 - g.y1);
  yAxis(svg, g, ymax, y, v => +(v * 100).toFixed(1) + "%");
  const every = bw >= 40 ? 1 : 2;
  edges.forEach((e, i) => {
    if (i % every === 0) label(svg, g.x0 + i * bw, g.y0 + 16, fmt(e));
  });
  label(svg, left(bins) + bw / 2, g.y0 + 16, "outside");
  label(svg, (g.x0 + g.x1) / 2, H - 4, "value, between the training deciles (share of rows)");
  let n = 0;
  const bar = (slot, i, v, color, series, text) => {
    tip(el("rect", {x: left(slot) + bw * 0.08 + i * gw, y: y(v), width: Math.max(gw - 1.5, 1),
      height: Math.max(g.y0 - y(v), 0), fill: color, rx: 1.5, "data-series": series}, svg), text);
    n++;
  };
  for (let b = 0; b < bins; b++) {
    // the end deciles are open (as PSI reads them): they hold the rows outside the range too
    const span = b === 0 ? "values up to " + fmt(edges[1]) + " (below the training minimum too)"
      : b === bins - 1 ? "values from " + fmt(edges[b]) + " (above the training maximum too)"
      : "values " + fmt(edges[b]) + "\u2013" + fmt(edges[b + 1]);
    if (isNum(shares[b])) bar(b, 0, shares[b], C.grey, "training", span + ": training " + pct(shares[b]));
    if (liveShares && isNum(liveShares[b])) {
      bar(b, 1, liveShares[b], C.blue, "live", span + ": live " + pct(liveShares[b]));
    }
  }
  if (isNum(outside)) {
    bar(bins, 0.5, outside, C.verm, "outside", "outside the training range " + fmt(edges[0]) +
      "\u2013" + fmt(edges[bins]) + ": " + pct(outside) + " of live rows");
  }
  if (!liveShares) label(svg, g.x0, 12, "waiting for data: no live window judged yet", "start");
  svg.setAttribute("data-points", String(n));
}

function featureFacts(doc) {
  const s = (doc.training || {}).stats || {}, live = doc.live, q = s.quantiles || {};
  const hist = Array.isArray(doc.history) ? doc.history : [];
  const psi = hist.length ? hist[hist.length - 1].psi : null;
  $("feature-facts").textContent = "training: min " + fmt(s.min) + ", median " + fmt(q["0.5"]) +
    ", max " + fmt(s.max) + " \u00b7 " + (live ? "live window: " + live.rows + " rows, " +
    pct(live.out_of_range_rate) + " outside the training range, PSI " + fmt(psi)
    : "no live window yet");
}

function featureRender(doc) {
  featureOptions(doc);
  featureFacts(doc);
  featureDistribution(featureSvg("distribution"), doc);
  lineChart(featureSvg("ood"), "legend-feature-ood", Array.isArray(doc.history) ? doc.history : [],
    [{key: "out_of_range_rate", label: doc.feature + " outside the training range",
      color: C.verm},
     {key: "ood_rate", label: "rows with any feature outside", color: C.purple, width: 1.6}],
    [], "waiting for data: no out-of-distribution rate yet");
}

async function featureRefresh() {
  clearTimeout(featureTimer);
  const view = $("feature-view");
  try {
    const url = FEATURE_SOURCE + (featurePick ? "?feature=" + encodeURIComponent(featurePick) : "");
    const resp = await fetch(url, {cache: "no-store", headers: {accept: "application/json"}});
    const doc = await resp.json().catch(() => null);
    if (!resp.ok || !doc || typeof doc !== "object") {
      const detail = doc && typeof doc.detail === "string" ? doc.detail : "";
      $("feature-facts").textContent = "cannot load the feature view: HTTP " + resp.status +
        (detail ? ": " + detail : "");
      view.setAttribute("data-status", "error");
      // a stale link (that feature is not in the spec): show the default; not when the
      // deployment is yet to be created (the pick was lost once it was; a probe)
      if (resp.status === 404 && featurePick && detail.includes("is not in the deployment's")) {
        featurePick = null;
        return featureRefresh();
      }
    } else {
      featureDoc = doc;
      featureRender(doc);
      view.setAttribute("data-status", "ok");
    }
  } catch (err) {
    console.error(err);
    $("feature-facts").textContent = "cannot load the feature view: " +
      (err && err.message ? err.message : String(err));
    view.setAttribute("data-status", "error");
  }
  featureTimer = setTimeout(featureRefresh, REFRESH_MS);
}
$("feature-pick").addEventListener("change", e => { featurePick = e.target.value; featureRefresh(); });
let featureResizing = null;
window.addEventListener("resize", () => { clearTimeout(featureResizing);
  featureResizing = setTimeout(() => featureDoc && featureRender(featureDoc), 150); });
featureRefresh();
