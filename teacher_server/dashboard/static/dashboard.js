// MaskedKD dashboard page: fetches /api/usage/* and renders totals, the per-key table, two uPlot charts and the
// latency table. No framework; uPlot (vendored) draws the charts.
"use strict";

const REFRESH_MS = 15000;
const COLORS = ["#2563eb", "#0b7a5a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#65a30d", "#db2777",
                "#4b5563", "#7c3aed"];

const state = { bucket: new URLSearchParams(location.search).get("bucket") || "minute", charts: {}, colors: {} };
window.maskedkdDashboard = state;  // lets tests and curious users read what the charts were given

// ---------------------------------------------------------------- formatting (the numbers tests read back)
const fmtInt = (n) => Number(n).toLocaleString("en-US", { maximumFractionDigits: 0 });
const fmtFixed = (n, d) => Number(n).toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
const fmtGflops = (n) => fmtFixed(n, 2);
const fmtPct = (n) => fmtFixed(n, 1) + " %";
const fmtMs = (n) => (n === null || n === undefined ? "–" : fmtFixed(n, 1));
function fmtMoney(n, currency) {
  return currency + " " + fmtFixed(n, Math.abs(n) >= 100 ? 2 : 6);
}
function fmtPrice(n, currency) {
  if (n === null) return currency + " ?";
  return currency + " " + (n !== 0 && Math.abs(n) < 0.001 ? Number(n).toExponential(2) : Number(n).toPrecision(3));
}
// costs as billed, one currency at a time ("USD 1.23", "USD 1.23 + EUR 0.50"); prices and currencies come from
// the ledger's usage rows, never from the settings of whoever serves this page
function fmtCosts(billed) {
  const per = {};
  for (const b of billed) per[b.currency] = (per[b.currency] || 0) + b.cost;
  const parts = Object.keys(per).sort().map((c) => fmtMoney(per[c], c));
  return parts.length ? parts.join(" + ") : fmtFixed(0, 6);
}
// GFLOPs of the probe requests with their share of all GFLOPs: "12.34 (4.1 %)"
function fmtShare(part, whole) {
  return `${fmtGflops(part)} (${fmtPct(whole > 0 ? 100 * part / whole : 0)})`;
}
const probesOf = (byPurpose) => (byPurpose || []).filter((p) => p.purpose === "probe");
// what the probes of a key cost: GFLOPs with their share on one line, money on the next
function probeCell(probeGflops, gflops, cost) {
  const cell = el("td", { class: "num", "data-field": "probes" });
  cell.append(el("span", { "data-field": "probe_gflops" }, fmtShare(probeGflops, gflops)),
              el("span", { class: "note", "data-field": "probe_cost" }, cost));
  return cell;
}
function fmtRefused(counts) {
  const reasons = Object.keys(counts || {}).sort();
  const total = reasons.reduce((acc, r) => acc + counts[r], 0);
  return total ? `${fmtInt(total)} (${reasons.map((r) => `${r} ${fmtInt(counts[r])}`).join(", ")})` : "0";
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: ${response.status} ${detail}`);
  }
  return response.json();
}

function colorOf(key) {
  if (!(key in state.colors)) state.colors[key] = COLORS[Object.keys(state.colors).length % COLORS.length];
  return state.colors[key];
}

// ---------------------------------------------------------------- totals and the per-key table
function renderUsage(usage) {
  const t = usage.total;
  const refusedAll = {};
  for (const counts of [usage.refused_without_key, ...usage.keys.map((k) => k.refused)]) {
    for (const [r, n] of Object.entries(counts)) refusedAll[r] = (refusedAll[r] || 0) + n;
  }
  const totals = { requests: fmtInt(t.requests), images: fmtInt(t.images), gflops: fmtGflops(t.gflops),
                   full_gflops: fmtGflops(t.full_gflops), saving_pct: fmtPct(t.saving_pct),
                   cost: fmtCosts(usage.cost_by_currency), refused: fmtRefused(refusedAll),
                   probe_gflops: fmtGflops(t.probe_gflops) + " GFLOPs",
                   probe_cost: `${fmtPct(t.gflops > 0 ? 100 * t.probe_gflops / t.gflops : 0)} of GFLOPs · ` +
                     fmtCosts(usage.keys.flatMap((k) => probesOf(k.by_purpose))) };
  for (const [field, text] of Object.entries(totals)) {
    document.querySelector(`[data-total="${field}"]`).textContent = text;
  }
  const body = document.querySelector("#keys tbody");
  body.replaceChildren();
  for (const k of usage.keys) {
    const row = el("tr", { "data-key": k.key });
    const name = el("td", { "data-field": "name" });
    name.append(el("span", { class: "swatch", style: `background:${colorOf(k.key)}` }), k.key);
    row.append(name, el("td", { "data-field": "key_prefix" }, k.key_prefix + "…"));
    const status = el("td", { "data-field": "status" });
    status.append(el("span", { class: k.disabled ? "badge off" : "badge" }, k.disabled ? "disabled" : "active"));
    row.append(status);
    const cells = [["requests", fmtInt(k.requests)], ["images", fmtInt(k.images)], ["gflops", fmtGflops(k.gflops)],
                   ["full_gflops", fmtGflops(k.full_gflops)], ["saving_pct", fmtPct(k.saving_pct)],
                   ["cost", fmtCosts(k.billed)], ["probes", null],
                   ["price", [...new Set(k.billed.map((b) => fmtPrice(b.price_per_gflop, b.currency)))].join(", ")
                     || "–"],
                   ["quota", k.quota_gflops === null ? "unlimited"
                     : `${fmtPct(k.quota_used_pct)} of ${fmtGflops(k.quota_gflops)}`],
                   ["refused", fmtRefused(k.refused)]];
    for (const [field, text] of cells) {
      row.append(field === "probes" ? probeCell(k.probe_gflops, k.gflops, fmtCosts(probesOf(k.by_purpose)))
        : el("td", { class: "num", "data-field": field }, text));
    }
    body.append(row);
  }
  if (!usage.keys.length) {
    const row = el("tr");
    row.append(el("td", { colspan: 13, class: "muted" },
      "No API keys yet: create one with `teacher-server keys create --name NAME` or POST /api/keys."));
    body.append(row);
  }
}

// ---------------------------------------------------------------- charts
function chartWidth(container) {
  return Math.max(320, container.clientWidth || container.parentElement.clientWidth - 24);
}

function drawChart(id, title, series, field, timestamps, extra) {
  const container = document.getElementById(id);
  if (state.charts[id]) { state.charts[id].destroy(); delete state.charts[id]; }
  container.replaceChildren();
  if (!timestamps.length) {
    container.append(el("div", { class: "empty" }, "no usage in this window"));
    return;
  }
  const data = [timestamps, ...series.map((s) => s[field])];
  const opts = {
    width: chartWidth(container), height: 260, title: undefined,
    scales: { x: { time: true } },
    series: [{}, ...series.map((s) => ({ label: s.key, stroke: colorOf(s.key), width: 2,
                                          fill: colorOf(s.key) + "1a", points: { show: timestamps.length < 90 } }))],
    axes: [{}, { size: 70 }],
  };
  if (extra) {
    data.push(extra.values);
    opts.series.push({ label: extra.label, stroke: "#9aa3b2", width: 1.5, dash: [6, 4] });
  }
  state.charts[id] = new uPlot(opts, data, container);
  state.charts[id].fieldName = field;
}

function renderSeries(ts) {
  const per = ts.bucket;
  document.getElementById("gflops-title").textContent = `GFLOPs per ${per} (dashed: full teacher, all keys)`;
  document.getElementById("cost-title").textContent =
    `Cost per ${per} (${ts.currency === null ? "as billed; several currencies or none" : ts.currency})`;
  const fullTotal = ts.timestamps.map((_, i) => ts.series.reduce((acc, s) => acc + s.full_gflops[i], 0));
  drawChart("chart-gflops", "GFLOPs", ts.series, "gflops", ts.timestamps,
            { label: "full teacher", values: fullTotal });
  drawChart("chart-cost", "cost", ts.series, "cost", ts.timestamps, null);
  state.lastSeries = ts;
}

// ---------------------------------------------------------------- per day (UTC)
function renderDaily(daily) {
  // one row per (day, key, currency, price) billed; a (day, key)'s refusals go on its first row, or on a row of
  // their own when that key had no usage that day
  const rows = daily.days.map((d) => ({ ...d, refused: {} }));
  const first = {};
  for (const d of rows) first[`${d.day}|${d.key}`] ||= d;
  for (const r of daily.refusals) {
    const cell = `${r.day}|${r.key ?? ""}`;
    if (!first[cell]) {
      first[cell] = { day: r.day, key: r.key, refused: {}, requests: 0, images: 0, gflops: 0, probe_gflops: 0,
                      currency: null };
      rows.push(first[cell]);
    }
    first[cell].refused[r.reason] = (first[cell].refused[r.reason] || 0) + r.count;
  }
  rows.sort((a, b) => (a.day < b.day) - (a.day > b.day) || String(a.key ?? "").localeCompare(String(b.key ?? "")));
  const body = document.querySelector("#daily tbody");
  body.replaceChildren();
  for (const d of rows) {
    const row = el("tr", { "data-day": d.day, "data-key": d.key ?? "" });
    row.append(el("td", { "data-field": "day" }, d.day), el("td", { "data-field": "key" }, d.key ?? "(no key)"));
    const cells = [["requests", fmtInt(d.requests)], ["images", fmtInt(d.images)], ["gflops", fmtGflops(d.gflops)],
                   ["cost", d.currency === null ? "–" : fmtMoney(d.cost, d.currency)],
                   ["probe_gflops", fmtShare(d.probe_gflops, d.gflops)],
                   ["probe_cost", d.currency === null ? "–" : fmtMoney(d.probe_cost, d.currency)],
                   ["price", d.currency === null ? "–" : fmtPrice(d.price_per_gflop, d.currency)],
                   ["refused", fmtRefused(d.refused)]];
    for (const [field, text] of cells) row.append(el("td", { class: "num", "data-field": field }, text));
    body.append(row);
  }
  state.lastDaily = daily;
}

// ---------------------------------------------------------------- latency table
function renderLatency(lat) {
  document.getElementById("latency-window").textContent = `(last ${fmtInt(lat.window_requests)} requests)`;
  const body = document.querySelector("#latency tbody");
  body.replaceChildren();
  for (const f of [...lat.keys, lat.overall]) {
    const row = el("tr", { "data-latency-key": f.key });
    row.append(el("td", {}, f.key === "*" ? "all keys" : f.key));
    const cells = [["requests", fmtInt(f.requests)], ["latency_ms_p50", fmtMs(f.latency_ms_p50)],
                   ["latency_ms_p95", fmtMs(f.latency_ms_p95)], ["latency_ms_max", fmtMs(f.latency_ms_max)],
                   ["queue_ms_p50", fmtMs(f.queue_ms_p50)], ["queue_ms_p95", fmtMs(f.queue_ms_p95)],
                   ["images_per_request_mean", fmtMs(f.images_per_request_mean)],
                   ["batch_images_mean", fmtMs(f.batch_images_mean)],
                   ["batch_images_max", f.batch_images_max === null ? "–" : fmtInt(f.batch_images_max)]];
    for (const [field, text] of cells) row.append(el("td", { class: "num", "data-field": field }, text));
    body.append(row);
  }
}

// ---------------------------------------------------------------- refresh loop
const DAILY_DAYS = 31;  // the per-day table's window; the CSV link exports all days
function dailySince() {
  const start = new Date(Date.now() - (DAILY_DAYS - 1) * 86400000);
  return start.toISOString().slice(0, 10) + "T00:00:00Z";
}

async function refresh() {
  const banner = document.getElementById("error");
  try {
    const [usage, ts, lat, daily] = await Promise.all([
      getJSON("api/usage/keys"), getJSON(`api/usage/timeseries?bucket=${encodeURIComponent(state.bucket)}`),
      getJSON("api/usage/latency?limit=1000"), getJSON(`api/usage/daily?since=${encodeURIComponent(dailySince())}`)]);
    for (const k of usage.keys) colorOf(k.key);  // colors follow the table's (name) order
    renderUsage(usage);
    renderSeries(ts);
    renderDaily(daily);
    renderLatency(lat);
    banner.hidden = true;
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.state = "ready";
  } catch (err) {
    banner.textContent = "Could not load usage: " + err.message;
    banner.hidden = false;
    if (document.body.dataset.state !== "ready") document.body.dataset.state = "error";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("bucket");
  select.value = ["minute", "hour", "day"].includes(state.bucket) ? state.bucket : "minute";
  select.addEventListener("change", () => {
    state.bucket = select.value;
    history.replaceState(null, "", `?bucket=${state.bucket}`);
    refresh();
  });
  window.addEventListener("resize", () => {
    for (const [id, chart] of Object.entries(state.charts)) {
      chart.setSize({ width: chartWidth(document.getElementById(id)), height: 260 });
    }
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
});
