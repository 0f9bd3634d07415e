// A small hand-written time-series chart on <canvas>: lines, stacked areas, a dashed
// reference line, nice y ticks, a clock x axis, and a shared hover crosshair.
"use strict";

const MillpondChart = (() => {
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // a tick step of 1, 2 or 5 x 10^k giving at most 5 intervals up to v, and the axis top
  function niceScale(v, integer) {
    if (!(v > 0)) v = 1;
    const raw = v / 5, p = Math.pow(10, Math.floor(Math.log10(raw)));
    let step = 10 * p;
    for (const m of [1, 2, 5]) if (m * p >= raw) { step = m * p; break; }
    if (integer && step < 1) step = 1;
    return {step, top: step * Math.ceil(v / step)};
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

  class Chart {
    // opts: {series: [{key, label, color, fill?, dashed?}], stacked?, format(v), minMax?}
    constructor(canvas, opts) {
      this.canvas = canvas;
      this.opts = opts;
      this.data = {};      // key -> [[t, v|null], ...]
      this.t0 = 0; this.t1 = 1;
      this.hoverT = null;
      this.onHover = null;
      canvas.addEventListener("mousemove", (e) => this._hover(e));
      canvas.addEventListener("mouseleave", () => this.onHover && this.onHover(null));
    }

    set(data, t0, t1) { this.data = data; this.t0 = t0; this.t1 = Math.max(t1, t0 + 1); }

    _geometry() {
      const rect = this.canvas.getBoundingClientRect();
      const w = Math.max(50, rect.width), h = Math.max(50, rect.height);
      return {w, h, left: 46, right: w - 8, top: 8, bottom: h - 20};
    }

    _hover(e) {
      const g = this._geometry();
      const x = e.clientX - this.canvas.getBoundingClientRect().left;
      const frac = Math.min(1, Math.max(0, (x - g.left) / (g.right - g.left)));
      if (this.onHover) this.onHover(this.t0 + frac * (this.t1 - this.t0));
    }

    // the values of each series at time t (nearest point at or before t)
    valuesAt(t) {
      const out = {};
      for (const s of this.opts.series) {
        const pts = this.data[s.key] || [];
        let v = null;
        for (let i = pts.length - 1; i >= 0; i--) {
          if (t === null || pts[i][0] <= t + 0.5) { v = pts[i][1]; break; }
        }
        out[s.key] = v;
      }
      return out;
    }

    _stackedTops() {
      // for stacked charts: cumulative sums per time, in series order
      const tops = {};
      let base = null;
      for (const s of this.opts.series) {
        const pts = this.data[s.key] || [];
        if (!s.fill) { tops[s.key] = pts; continue; }
        const cur = pts.map(([t, v], i) => [t, (v || 0) + (base ? (base[i] ? base[i][1] : 0) : 0)]);
        tops[s.key] = cur; base = cur;
      }
      return tops;
    }

    draw() {
      const c = this.canvas, dpr = window.devicePixelRatio || 1;
      const g = this._geometry();
      if (c.width !== Math.round(g.w * dpr) || c.height !== Math.round(g.h * dpr)) {
        c.width = Math.round(g.w * dpr); c.height = Math.round(g.h * dpr);
      }
      const ctx = c.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, g.w, g.h);
      const stacked = this.opts.stacked;
      const lines = stacked ? this._stackedTops() : this.data;
      let max = this.opts.minMax || 0;
      for (const s of this.opts.series) {
        for (const [, v] of lines[s.key] || []) if (v !== null && v > max) max = v;
      }
      const scale = niceScale(max * 1.05, this.opts.integer);
      const yMax = scale.top;
      const X = (t) => g.left + (t - this.t0) / (this.t1 - this.t0) * (g.right - g.left);
      const Y = (v) => g.bottom - v / yMax * (g.bottom - g.top);
      this._grid(ctx, g, scale, X, Y);
      let below = null;
      const visible = (key) => (lines[key] || []).filter(([t]) => t >= this.t0 - 1);
      for (const s of this.opts.series) {
        if (stacked && s.fill) { const pts = visible(s.key); this._area(ctx, pts, below, s.color, X, Y); below = pts; }
      }
      // lines last, bottom layer on top, so a layer of height 0 does not hide the one below
      for (const s of [...this.opts.series].reverse()) this._line(ctx, visible(s.key), s, X, Y);
      if (this.hoverT !== null) {
        const x = X(this.hoverT);
        ctx.strokeStyle = css("--muted"); ctx.setLineDash([2, 3]); ctx.lineWidth = 1;
        ctx.beginPath(); ctx.moveTo(x, g.top); ctx.lineTo(x, g.bottom); ctx.stroke();
        ctx.setLineDash([]);
      }
    }

    _grid(ctx, g, scale, X, Y) {
      ctx.font = "11px system-ui, sans-serif";
      ctx.fillStyle = css("--muted"); ctx.strokeStyle = css("--grid"); ctx.lineWidth = 1;
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      for (let v = 0; v <= scale.top + scale.step / 2; v += scale.step) {
        const y = Math.round(Y(v)) + 0.5;
        ctx.beginPath(); ctx.moveTo(g.left, y); ctx.lineTo(g.right, y); ctx.stroke();
        ctx.fillText(this.opts.format(v), g.left - 6, y);
      }
      const span = this.t1 - this.t0;
      const step = span > 600 ? 120 : span > 240 ? 60 : span > 90 ? 30 : span > 30 ? 10 : 5;
      ctx.textAlign = "center"; ctx.textBaseline = "top";
      let lastRight = -Infinity;
      for (let t = Math.ceil(this.t0 / step) * step; t <= this.t1; t += step) {
        const x = Math.round(X(t)) + 0.5;
        ctx.beginPath(); ctx.moveTo(x, g.top); ctx.lineTo(x, g.bottom); ctx.stroke();
        const label = clock(t), half = ctx.measureText(label).width / 2;
        if (x - half < lastRight + 6 || x + half > g.w) continue;  // no overlaps, no overflow
        ctx.fillText(label, x, g.bottom + 5);
        lastRight = x + half;
      }
    }

    _area(ctx, pts, below, color, X, Y) {
      if (!pts.length) return;
      ctx.beginPath();
      pts.forEach(([t, v], i) => (i ? ctx.lineTo(X(t), Y(v)) : ctx.moveTo(X(t), Y(v))));
      if (below && below.length) {
        for (let i = below.length - 1; i >= 0; i--) ctx.lineTo(X(below[i][0]), Y(below[i][1]));
      } else {
        ctx.lineTo(X(pts[pts.length - 1][0]), Y(0)); ctx.lineTo(X(pts[0][0]), Y(0));
      }
      ctx.closePath();
      ctx.globalAlpha = 0.35; ctx.fillStyle = color; ctx.fill(); ctx.globalAlpha = 1;
    }

    _line(ctx, pts, s, X, Y) {
      ctx.strokeStyle = s.color; ctx.lineWidth = s.dashed ? 1.25 : 1.75;
      ctx.setLineDash(s.dashed ? [5, 4] : []);
      ctx.beginPath();
      let pen = false;
      for (const [t, v] of pts) {
        if (v === null || v === undefined) { pen = false; continue; }
        if (pen) ctx.lineTo(X(t), Y(v)); else { ctx.moveTo(X(t), Y(v)); pen = true; }
      }
      ctx.stroke(); ctx.setLineDash([]);
    }
  }

  return {Chart, niceScale, css};
})();
