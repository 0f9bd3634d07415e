// The millpond dashboard: polls api/snapshot every second and draws what the pools do.
"use strict";

(() => {
  const POLL_MS = 1000;
  const WINDOW_S = 300;
  const ALL = "*";
  const $ = (id) => document.getElementById(id);
  const css = MillpondChart.css;

  let seq = 0;            // last history point received
  let points = [];        // derived points: {t, seq, pools: {key: {...}}, clients}
  let snap = null;        // the latest snapshot
  let scope = ALL;        // selected pool key
  let hoverT = null;
  let failures = 0;

  // ---------------------------------------------------------------- formatting

  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (digits === undefined) digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2;
    return Number(v).toLocaleString("en-US", {maximumFractionDigits: digits, minimumFractionDigits: 0});
  }
  function int(v) { return v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"); }
  function dur(s) {
    if (s === null || s === undefined) return "–";
    if (s === 0) return "0";
    if (s < 1e-3) return num(s * 1e6, 0) + " µs";
    if (s < 1) return num(s * 1e3) + " ms";
    if (s < 120) return num(s) + " s";
    return num(s / 60, 1) + " min";
  }
  function uptime(s) {
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    return m ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(s)}s`;
  }
  function bytes(n) {
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return num(n, i ? 1 : 0) + " " + units[i];
  }
  function setting(v) {
    if (v === null || v === undefined) return "off";
    if (typeof v === "number" && v >= 3e8) return "∞";
    return String(v);
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  function text(id, value) { const n = $(id); if (n && n.textContent !== value) n.textContent = value; }

  // ---------------------------------------------------------------- aggregates

  const SUMMED = ["size", "idle", "in_use", "connecting", "resetting", "waiting", "max_size", "min_size",
                  "acquires", "timeouts", "connect_errors", "leaks", "waits", "rejected"];

  function scoped(key = scope) {
    // the snapshot's numbers for one pool, or summed over every pool for ALL
    const pools = snap ? snap.pools : [];
    if (key !== ALL) return pools.find((p) => p.key === key) || null;
    const out = {key: ALL, name: "all pools", proxy: null, max_wait: 0};
    for (const f of SUMMED) out[f] = pools.reduce((a, p) => a + (p[f] || 0), 0);
    out.max_wait = Math.max(0, ...pools.map((p) => (p.proxy ? p.proxy.max_wait : 0)));
    return out;
  }

  function latest() { return points.length ? points[points.length - 1] : null; }
  function pointOf(p, key) { return p && p.pools ? p.pools[key] || null : null; }

  // ---------------------------------------------------------------- charts

  const isProxy = () => snap && snap.kind === "proxy";
  const ms = (v) => (v === null || v === undefined ? null : v * 1000);

  const charts = {
    connections: new MillpondChart.Chart($("chart-connections"), {
      stacked: true, integer: true, minMax: 1, format: (v) => num(v, 0),
      series: [
        {key: "in_use", label: "in use", color: css("--s-in_use"), fill: true},
        {key: "resetting", label: "resetting", color: css("--s-resetting"), fill: true},
        {key: "connecting", label: "connecting", color: css("--s-connecting"), fill: true},
        {key: "idle", label: "idle", color: css("--s-idle"), fill: true},
        {key: "max_size", label: "max", color: css("--s-max"), dashed: true},
      ]}),
    waiting: new MillpondChart.Chart($("chart-waiting"), {
      integer: true, minMax: 1, format: (v) => num(v, 0),
      series: [
        {key: "waiting", label: "waiting", color: css("--s-waiting")},
        {key: "timeout_rate", label: "timeouts / s", color: css("--s-timeouts"), dashed: true},
      ]}),
    throughput: new MillpondChart.Chart($("chart-throughput"), {
      minMax: 1, format: (v) => num(v), series: []}),
    wait: new MillpondChart.Chart($("chart-wait"), {
      minMax: 0.1, format: (v) => num(v) + " ms",
      series: [
        {key: "wait_p50", label: "p50", color: css("--s-p50"), map: ms},
        {key: "wait_p90", label: "p90", color: css("--s-p90"), map: ms},
        {key: "wait_p99", label: "p99", color: css("--s-p99"), map: ms},
      ]}),
  };
  const legendFormat = {
    connections: (v) => int(v), waiting: (v) => num(v), throughput: (v) => num(v),
    wait: (v) => (v === null ? "–" : num(v) + " ms"),
  };

  function throughputSeries() {
    if (isProxy()) {
      return [
        {key: "xact_rate", label: "transactions / s", color: css("--s-rate1")},
        {key: "query_rate", label: "queries / s", color: css("--s-rate2")},
      ];
    }
    return [{key: "acquire_rate", label: "acquires / s", color: css("--s-rate1")}];
  }

  function drawCharts() {
    charts.throughput.opts.series = throughputSeries();
    const last = latest();
    const t1 = last ? last.t : Date.now() / 1000;
    const first = points.length ? points[0].t : t1;
    const span = Math.min(WINDOW_S, Math.max(60, t1 - first));
    for (const [name, chart] of Object.entries(charts)) {
      const data = {};
      for (const s of chart.opts.series) {
        data[s.key] = points.map((p) => {
          const v = pointOf(p, scope) ? pointOf(p, scope)[s.key] : null;
          return [p.t, s.map ? s.map(v) : v === undefined ? null : v];
        });
      }
      chart.set(data, t1 - span, t1);
      chart.hoverT = hoverT;
      chart.draw();
      legend(name, chart);
    }
  }

  function legend(name, chart) {
    const box = $("legend-" + name);
    const values = chart.valuesAt(hoverT);
    box.replaceChildren(...chart.opts.series.map((s) =>
      el("span", {"data-series": s.key},
        el("span", {class: "sw", style: `background:${s.color}`}), s.label + " ",
        el("b", {}, legendFormat[name](values[s.key])))));
    if (hoverT !== null) box.append(el("span", {}, "at " + new Date(hoverT * 1000).toTimeString().slice(0, 8)));
  }

  for (const chart of Object.values(charts)) {
    chart.onHover = (t) => { hoverT = t; drawCharts(); };
  }
  window.addEventListener("resize", () => drawCharts());

  // ---------------------------------------------------------------- header, cards

  function renderHeader() {
    document.body.classList.toggle("proxy", isProxy());
    text("kind", isProxy() ? "proxy" : "application");
    text("version", "millpond " + snap.version);
    text("uptime", uptime(snap.uptime));
    const health = snap.health || {ready: true, reasons: []};
    const pill = $("ready");
    pill.textContent = health.ready ? "ready" : "not ready";
    pill.className = "pill " + (health.ready ? "ok" : "bad");
    const reasons = $("reasons");
    reasons.hidden = health.ready || !health.reasons.length;
    reasons.replaceChildren(el("b", {}, "Not ready:"),
      el("ul", {}, ...health.reasons.map((r) => el("li", {}, r))));
    const clients = snap.proxy ? snap.proxy.clients : null;
    $("clients-summary").hidden = !clients;
    if (clients) {
      const total = Object.values(clients).reduce((a, b) => a + b, 0);
      text("clients-total", int(total));
      const parts = Object.entries(clients).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`);
      if (snap.proxy.pinned) parts.push(`${snap.proxy.pinned} pinned`);
      text("clients-breakdown", parts.join(", ") || "none");
    }
    if (snap.proxy && snap.proxy.shutting_down) pill.textContent = "shutting down";
  }

  function renderCards() {
    const s = scoped();
    const p = pointOf(latest(), scope);
    if (!s) return;
    text("card-in_use", int(s.in_use));
    text("card-size", int(s.size));
    text("card-max_size", int(s.max_size));
    text("card-idle", int(s.idle));
    text("card-connecting", int(s.connecting));
    text("card-waiting", int(s.waiting));
    text("card-max_wait", dur(s.proxy ? s.proxy.max_wait : s.max_wait || 0));
    if (isProxy()) {
      text("card-rate-label", "transactions / s");
      text("card-rate", p ? num(p.xact_rate) : "–");
      const q = p ? num(p.query_rate) : "–";
      $("card-rate-sub").replaceChildren("queries / s ", el("b", {}, q), " · assignments ",
        el("span", {id: "card-acquires", "data-field": "acquires"}, int(s.acquires)));
    } else {
      text("card-rate-label", "acquires / s");
      text("card-rate", p ? num(p.acquire_rate) : "–");
      text("card-acquires", int(s.acquires));
    }
    text("card-wait_p50", p ? dur(p.wait_p50) : "–");
    text("card-wait_p99", p ? dur(p.wait_p99) : "–");
    text("card-use_mean", p ? dur(p.use_mean) : "–");
    text("card-timeouts", int(s.timeouts));
    text("card-connect_errors", int(s.connect_errors));
    text("card-leaks", int(s.leaks));
    const problems = (s.timeouts || 0) + (s.connect_errors || 0) + (s.leaks || 0);
    text("card-problems", problems ? int(problems) : "none");
    text("scope-name", s.key === ALL ? `all pools (${snap.pools.length})` : s.name);
    const title = `millpond ${isProxy() ? "proxy" : "app"} · ${int(s.in_use)}/${int(s.size)} in use`;
    if (document.title !== title) document.title = title;
  }

  // ---------------------------------------------------------------- table, settings

  function cell(field, value, cls) {
    return el("td", {"data-field": field, class: cls === undefined ? "num" : cls}, value);
  }

  function poolRow(p, point) {
    const proxy = p.proxy;
    const rate = point ? (proxy ? point.xact_rate : point.acquire_rate) : null;
    const clients = proxy ? `${proxy.clients.active || 0} / ${proxy.clients.idle || 0} / ${proxy.clients.waiting || 0}` : "";
    const where = [p.labels.database, p.labels.user, p.labels.host, p.labels.role]
      .filter((x) => x).join(" · ");
    const tr = el("tr", {"data-pool": p.key},
      el("td", {class: "pool"}, el("span", {"data-field": "name"}, p.name),
        el("small", {"data-field": "where", title: "database · user · host · role"}, where)),
      cell("mode", proxy ? proxy.mode : "", "proxy-only"),
      cell("in_use", int(p.in_use)), cell("idle", int(p.idle)),
      cell("size", `${int(p.size)} / ${int(p.max_size)}`), cell("waiting", int(p.waiting)),
      cell("clients", clients, "num proxy-only"), cell("rate", num(rate)),
      cell("wait_p99", dur(point ? point.wait_p99 : null)),
      cell("use_mean", dur(point ? point.use_mean : null)),
      cell("acquires", int(p.acquires)), cell("timeouts", int(p.timeouts)),
      cell("breaker", p.breaker_state, "breaker-" + p.breaker_state),
      cell("ready", p.ready ? "yes" : "no", p.ready ? "yes" : "no"));
    return tr;
  }

  function renderTable() {
    const last = latest();
    const rows = [];
    if (snap.pools.length !== 1) {
      const all = {...scoped(ALL), name: "all pools", labels: {}, breaker_state: "",
        ready: snap.health ? snap.health.ready : true,
        proxy: isProxy() ? {mode: "", clients: snap.proxy.clients} : null};
      const row = poolRow(all, pointOf(last, ALL));
      row.classList.add("all");
      rows.push(row);
    }
    for (const p of snap.pools) rows.push(poolRow(p, pointOf(last, p.key)));
    for (const row of rows) {
      if (row.dataset.pool === scope) row.classList.add("selected");
      row.addEventListener("click", () => { scope = row.dataset.pool; renderAll(); });
    }
    document.querySelector("#pools tbody").replaceChildren(...rows);
  }

  function renderSettings() {
    let settings = null, of = "";
    const pool = snap.pools.find((p) => p.key === scope);
    if (pool) { settings = pool.settings; of = pool.name; }
    else if (snap.proxy) { settings = snap.proxy.settings; of = "proxy-wide"; }
    else if (snap.pools.length === 1) { settings = snap.pools[0].settings; of = snap.pools[0].name; }
    text("settings-of", of ? "— " + of : "— select a pool");
    $("settings").replaceChildren(...Object.entries(settings || {}).map(([k, v]) =>
      el("div", {}, el("dt", {}, k), el("dd", {"data-setting": k}, setting(v)))));
  }

  function renderAll() {
    if (!snap) return;
    if (scope !== ALL && !snap.pools.some((p) => p.key === scope)) scope = ALL;
    renderHeader();
    renderCards();
    renderTable();
    renderSettings();
    drawCharts();
  }

  // ---------------------------------------------------------------- polling

  async function poll() {
    try {
      const response = await fetch(`api/snapshot?history=${seq}`, {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      const history = data.history || {seq: 0, points: []};
      if (history.seq < seq) points = [];   // the server restarted
      points = points.concat(history.points);
      seq = history.seq;
      const cutoff = data.time - WINDOW_S - 5;
      while (points.length && points[0].t < cutoff) points.shift();
      snap = data;
      failures = 0;
      $("offline").hidden = true;
      $("live").className = "live";
      text("live", "updated " + new Date(data.time * 1000).toTimeString().slice(0, 8));
      renderAll();
    } catch (err) {
      failures += 1;
      $("offline").hidden = failures < 2;
      $("live").className = "live stale";
      text("live", "no answer (" + err.message + ")");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
