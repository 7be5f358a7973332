// The dashboard: polls GET /dashboard/stats once per sampling interval, shows the engine now and draws the
// last minutes as small canvas charts (no chart library).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = { blue: "#0b57a4", orange: "#c25400", green: "#2b7a2b", purple: "#6b3fa0", grey: "#6a6a6a",
  red: "#a11a1a" };
const view = { samples: [], capacity: 300, interval: 1, lastTime: null };

function fmt(x, digits = 1) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a >= 1e6) return (x / 1e6).toFixed(digits) + "M";
  if (a >= 1e4) return (x / 1e3).toFixed(digits) + "k";
  if (a >= 100) return x.toFixed(0);
  return x.toFixed(digits);
}

function pct(x) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(x < 0.1 ? 2 : 1) + "%";
}

function setStat(id, text, value) {
  const el = $(id);
  el.textContent = text;
  if (value !== undefined) el.dataset.value = value === null ? "" : String(value);
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

// Lines (or stacked areas) of `series` over the sampling window ending at the newest sample.
function drawChart(canvas, series, options = {}) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, width, height);
  const samples = view.samples;
  const left = 44, right = 8, top = 8, bottom = 20;
  const w = width - left - right, h = height - top - bottom;
  const end = samples.length ? samples[samples.length - 1].time : 0;
  // the window grows with the data, from one minute up to the whole ring (five minutes at 1 Hz)
  const full = view.capacity * view.interval;
  const span = samples.length ? Math.min(full, Math.max(60, end - samples[0].time)) : full;
  const x = (t) => left + w * (1 - (end - t) / span);
  let values = series.map((s) => samples.map(s.value));
  if (options.stacked) {
    const sums = samples.map(() => 0);
    values = values.map((vs) => vs.map((v, i) => (v === null ? null : (sums[i] += v))));
  }
  let max = options.max || 0;
  if (!options.max) for (const vs of values) for (const v of vs) if (v !== null && v > max) max = v;
  max = options.max || niceMax(max * 1.05);
  const y = (v) => top + h * (1 - v / max);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#4a4a4a";
  g.strokeStyle = "#e2e2e2";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    g.beginPath(); g.moveTo(left, y(v)); g.lineTo(left + w, y(v)); g.stroke();
    g.fillText(options.percent ? (100 * v).toFixed(max < 0.1 ? 2 : 0) + "%" : fmt(v, v < 10 ? 1 : 0), 2, y(v) + 4);
  }
  g.fillText(span >= 120 ? `-${(span / 60).toFixed(1)} min` : `-${span.toFixed(0)} s`, left, height - 5);
  g.fillText("now", left + w - 20, height - 5);
  if (options.stacked) {  // areas, the outermost first, so each stage shows as its own band
    for (let k = series.length - 1; k >= 0; k--) {
      const points = samples.map((sample, i) => [sample.time, values[k][i]])
        .filter(([t, v]) => v !== null && t >= end - span);
      if (!points.length) continue;
      g.globalAlpha = 0.45;
      g.fillStyle = series[k].color;
      g.beginPath();
      g.moveTo(x(points[0][0]), y(0));
      for (const [t, v] of points) g.lineTo(x(t), y(v));
      g.lineTo(x(points[points.length - 1][0]), y(0));
      g.closePath();
      g.fill();
      g.globalAlpha = 1;
    }
  }
  series.forEach((s, k) => {
    g.strokeStyle = s.color;
    g.lineWidth = s.width || 1.8;
    g.setLineDash(s.dash || []);
    g.beginPath();
    let isDrawing = false;
    samples.forEach((sample, i) => {
      const v = values[k][i];
      if (v === null || sample.time < end - span) { isDrawing = false; return; }
      if (isDrawing) g.lineTo(x(sample.time), y(v)); else g.moveTo(x(sample.time), y(v));
      isDrawing = true;
    });
    g.stroke();
  });
  g.setLineDash([]);
}

function keys(id, series) {
  const el = $(id);
  if (el.childElementCount) return;
  for (const s of series) {
    const key = document.createElement("span");
    key.textContent = s.label;
    key.style.setProperty("--c", s.color);
    el.appendChild(key);
  }
}

const CHARTS = [
  ["throughput", [{ label: "generated tok/s", color: COLORS.blue, value: (s) => s.generation_tok_s },
    { label: "roofline tok/s at the batch", color: COLORS.red, dash: [5, 3], value: (s) => s.roofline_tok_s }]],
  ["batch", [{ label: "running", color: COLORS.blue, value: (s) => s.num_running },
    { label: "waiting", color: COLORS.orange, value: (s) => s.num_waiting },
    { label: "mean batch per step", color: COLORS.green, dash: [4, 2], value: (s) => s.batch_size }]],
  ["kv", [{ label: "blocks in use (the cache's total is in the card above)", color: COLORS.purple,
    value: (s) => s.kv_blocks_used }]],
  ["step", [{ label: "schedule", color: COLORS.orange, value: (s) => (s.step ? s.step.schedule_ms : null) },
    { label: "+ model (forward, sampling)", color: COLORS.blue, value: (s) => (s.step ? s.step.execute_ms : null) },
    { label: "+ outputs (detokenize, stops)", color: COLORS.green, value: (s) => (s.step ? s.step.output_ms : null) }],
    { stacked: true }],
  ["prompt", [{ label: "prompt tok/s", color: COLORS.blue, value: (s) => s.prompt_tok_s }]],
  ["fraction", [{ label: "generated / roofline", color: COLORS.red, value: (s) => s.roofline_fraction },
    { label: "prefix-cache hit rate", color: COLORS.green, dash: [4, 2], value: (s) => s.prefix_cache_hit_rate }],
    { percent: true }],
];

function drawAll() {
  for (const [name, series, options] of CHARTS) {
    keys("keys-" + name, series);
    drawChart($("chart-" + name), series, options);
  }
}

function latestWithRoofline() {
  for (let i = view.samples.length - 1; i >= 0 && i >= view.samples.length - 5; i--) {
    if (view.samples[i].roofline_tok_s) return view.samples[i];
  }
  return null;
}

function showReport(report) {
  const s = report.latest;
  const t = report.totals;
  setStat("stat-running", String(t.num_running), t.num_running);
  setStat("stat-waiting", String(t.num_waiting), t.num_waiting);
  setStat("stat-prompt-total", `${fmt(t.prompt_tokens, 0)} admitted since start`);
  setStat("stat-gen-total", `${fmt(t.generated_tokens, 0)} generated since start`, t.generated_tokens);
  if (s) {
    setStat("stat-batch", fmt(s.batch_size), s.batch_size);
    setStat("stat-steps", `${fmt(s.num_steps / report.interval_s)} steps/s`);
    setStat("stat-kv", `${s.kv_blocks_used} / ${s.kv_blocks_total}`, s.kv_blocks_used);
    setStat("stat-kv-share", `${pct(s.kv_blocks_total ? s.kv_blocks_used / s.kv_blocks_total : 0)} of the cache`);
    setStat("stat-prefix", pct(s.prefix_cache_hit_rate), s.prefix_cache_hit_rate);
    setStat("stat-prompt-tps", fmt(s.prompt_tok_s), s.prompt_tok_s);
    setStat("stat-gen-tps", fmt(s.generation_tok_s), s.generation_tok_s);
    const peak = Math.max(...view.samples.map((x) => x.generation_tok_s));
    $("stat-gen-tps").dataset.peak = String(peak);
    setStat("stat-gen-total", `${fmt(t.generated_tokens, 0)} generated since start, peak ${fmt(peak)} tok/s`,
      t.generated_tokens);
    if (s.step) {
      const total = s.step.schedule_ms + s.step.execute_ms + s.step.output_ms;
      setStat("stat-step", `${fmt(total)} ms`, total);
      setStat("stat-step-split", `${fmt(s.step.schedule_ms, 2)} / ${fmt(s.step.execute_ms)} / ` +
        `${fmt(s.step.output_ms, 2)} ms: schedule / model / outputs`);
    } else {
      setStat("stat-step", "idle", null);
      setStat("stat-step-split", "no step in the last interval");
    }
  }
  const r = latestWithRoofline();
  if (r) {
    setStat("stat-fraction", pct(r.roofline_fraction), r.roofline_fraction);
    setStat("stat-roofline", `${fmt(r.roofline_tok_s)} tok/s allowed at batch ${Math.round(r.batch_size)}`);
    setStat("roofline-summary", `batch ${Math.round(r.batch_size)} at ${fmt(r.context_tokens, 0)} tokens of ` +
      `context: this hardware allows ${fmt(r.roofline_tok_s)} tok/s, the engine runs ${fmt(r.generation_tok_s)} ` +
      `tok/s (${pct(r.roofline_fraction)} of the roofline)`);
  } else if (report.roofline_error) {
    setStat("roofline-summary", `no roofline: ${report.roofline_error}`);
  }
  const basis = report.roofline;
  if (basis) {
    $("roofline-basis").textContent = `roofline from the planner: hardware ${basis.hardware} ` +
      `(${basis.source === "calibration" ? "measured by roofline calibrate" : "a preset, not measured here"}; ` +
      `${basis.detail}); weights ${basis.weight_format}, KV cache ${basis.kv_format}; decode steps only`;
  }
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function poll() {
  try {
    const query = view.lastTime === null ? "" : `?since=${view.lastTime}`;
    const response = await apiFetch("/dashboard/stats" + query);
    if (!response.ok) throw new Error(await errorText(response));
    const report = await response.json();
    view.capacity = report.capacity;
    view.interval = report.interval_s;
    if (view.lastTime === null) view.samples = [];
    view.samples.push(...report.samples);
    if (view.samples.length > view.capacity) view.samples.splice(0, view.samples.length - view.capacity);
    if (view.samples.length) view.lastTime = view.samples[view.samples.length - 1].time;
    $("error").textContent = "";
    showReport(report);
    drawAll();
  } catch (err) {
    $("error").textContent = "cannot read /dashboard/stats: " + String(err.message || err);
  }
  setTimeout(poll, 1000 * view.interval);
}

document.addEventListener("DOMContentLoaded", () => {
  loadModelName($("model-name"));
  window.addEventListener("resize", drawAll);
  poll();
});
