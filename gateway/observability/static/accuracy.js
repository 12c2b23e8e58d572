/* The dashboard's live-accuracy section, apart from the drift charts (dashboard.js, whose
   drawing helpers it reuses): asks the same /drift report every 5 s and draws the accuracy of
   each role's current version over time, and a table of the current figures per role and
   version. Only labelled requests count (POST /v1/deployments/{d}/feedback). */
"use strict";
const ROLE_COLORS = [C.blue, C.orange, C.green, C.purple, C.verm, C.sky, C.grey];

function accuracySeries(history) {
  const roles = [];
  for (const p of history) {
    for (const r in (p && p.roles) || {}) if (!roles.includes(r)) roles.push(r);
  }
  roles.sort((a, b) => (a === "real" ? -1 : b === "real" ? 1 : a.localeCompare(b)));
  const points = history.filter(p => p && isNum(p.ts_ms)).map(p => {
    const flat = {ts_ms: p.ts_ms};
    for (const r of roles) {
      const v = p.roles && p.roles[r];
      flat["acc:" + r] = v && isNum(v.accuracy) ? v.accuracy : null;
    }
    return flat;
  });
  const series = roles.map((r, i) => ({key: "acc:" + r, label: r,
                                       color: ROLE_COLORS[i % ROLE_COLORS.length]}));
  return {points: points, series: series};
}

function accuracyTable(report) {
  const rows = ((report && report.models) || []).map(m => {
    const tr = node("tr");
    if (m.current) tr.className = "current";
    tr.append(node("td", m.role), node("td", m.model + (m.current ? "" : " (earlier)")),
      node("td", String(m.labelled + m.judged)), node("td", pct(m.accuracy)),
      node("td", fmt(m.log_loss)), node("td", fmt(m.brier)), node("td", fmt(m.ece)));
    return tr;
  });
  if (!rows.length) {
    const empty = node("tr");
    empty.append(Object.assign(node("td", "no labelled request yet", "muted"), {colSpan: 7}));
    rows.push(empty);
  }
  $("accuracy-rows").replaceChildren(...rows);
}

async function refreshAccuracy() {
  try {
    const resp = await fetch(SOURCE, {cache: "no-store", headers: {accept: "application/json"}});
    const doc = resp.ok ? await resp.json() : null;
    // a failed read keeps what is drawn: it read "no labelled request yet" (a probe)
    if (!doc || typeof doc !== "object") throw new Error("HTTP " + resp.status);
    const section = doc.accuracy || {};
    const history = Array.isArray(section.history) ? section.history : [];
    const s = accuracySeries(history);
    lineChart(document.querySelector('svg[data-chart="accuracy"]'), "legend-accuracy", s.points,
      s.series, [], "no labelled request yet: send labels to POST .../feedback");
    accuracyTable(section.current);
  } catch (err) {  // kept as drawn; the drift section's banner says why (the same report)
  }
  setTimeout(refreshAccuracy, REFRESH_MS);
}
refreshAccuracy();
