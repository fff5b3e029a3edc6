// The rollout dashboard: one page, three views (the lists, one rollout, one simulated run),
// fed by polling the JSON endpoints of `rollout ui`. Charts are uPlot, served from /static.
"use strict";

const CSRF = document.querySelector('meta[name="csrf"]').content;
const KIND = document.querySelector('meta[name="kind"]').content;
const POLL_MS = 1000;
const LIST_POLL_MS = 2000;
const ROLES = ["current", "candidate"];
const COLOR = { current: "#3b73b9", candidate: "#e8772e", gpus: "#5b6770", weight: "#e8772e" };
const CONTROLS = [
  ["pause", "Pause"], ["resume", "Resume"], ["cancel", "Cancel"],
  ["force_cancel", "Force-cancel"], ["roll_forward", "Roll forward"],
];
// What tests and scripts read back: load time, update lags (s), polls done.
const ui = (window.rolloutUI = { loadMs: null, lags: [], polls: 0, drawn: 0 });

// ---- small helpers ---------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}
const $ = (sel) => document.querySelector(sel);

function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${sec} s`;
  return `${sec} s`;
}
function fmtRel(x) { // seconds since the rollout started, as m:ss
  const sign = x < 0 ? "−" : "";
  x = Math.abs(Math.round(x));
  return `${sign}${Math.floor(x / 60)}:${String(x % 60).padStart(2, "0")}`;
}
function fmtClock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}
function fmtDate(t) {
  const d = new Date(t * 1000);
  return d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " +
    d.toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
const pct = (w) => `${Math.round((w || 0) * 100)} %`;
const fmtNum = (x, d = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const badge = (state) => el("span", { class: `badge ${state}`, id: "state" }, state);
const controlName = (c) => c.replace("_", "-");

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!r.ok) throw new Error(`${r.status} ${url}`);
  return r.json();
}

function setLive(on, text) {
  const live = $("#live");
  live.className = `live ${on ? "on" : "off"}`;
  live.textContent = text;
}

function weightBar(w) {
  return el("span", {}, el("span", { class: "bar" }, el("i", { style: `width:${Math.round((w || 0) * 100)}%` })), pct(w));
}

// ---- the lists -------------------------------------------------------------------------------

async function listView() {
  $("#crumbs").textContent = "rollouts and simulated runs";
  const main = $("#main");
  let first = true;
  for (;;) {
    try {
      const data = await getJSON("/api/rollouts");
      main.replaceChildren(rolloutsTable(data.rollouts), runsTable(data.runs));
      setLive(true, `updated ${new Date().toLocaleTimeString([], { hour12: false })}`);
      if (first) { ui.loadMs = performance.now(); first = false; }
    } catch (e) {
      setLive(false, "cannot reach rollout ui; retrying");
    }
    await sleep(LIST_POLL_MS);
  }
}

function rolloutsTable(rows) {
  const body = rows.length
    ? el("tbody", {}, rows.map((r) => el("tr", { "data-id": r.id },
        el("td", {}, el("span", { class: `badge ${r.state}` }, r.state)),
        el("td", {}, el("a", { href: `/rollouts/${encodeURIComponent(r.id)}`, class: "mono" }, r.id)),
        el("td", {}, r.app),
        el("td", {}, `${r.from_version || "nothing"} → ${r.to_version}`),
        el("td", { class: "num" }, r.steps ? `${r.step} / ${r.steps}` : r.step),
        el("td", {}, weightBar(r.candidate_weight)),
        el("td", {}, fmtDate(r.started)),
        el("td", { class: "num" }, fmtDuration(r.duration_s)),
      )))
    : el("tbody", {}, el("tr", {}, el("td", { colspan: 8, class: "empty" },
        "No rollout in the store yet: `rollout deploy DEPLOY.yaml` starts one.")));
  return el("section", {}, el("h2", {}, "Rollouts"), el("div", { class: "tablewrap" }, el("table", { id: "rollouts" },
    el("thead", {}, el("tr", {}, ["State", "ID", "Model", "Versions", "Step", "Weight", "Started", "Duration"]
      .map((h, i) => el("th", { class: [4, 7].includes(i) ? "num" : null }, h)))),
    body)));
}

function runsTable(rows) {
  const body = rows.length
    ? el("tbody", {}, rows.map((r) => el("tr", {},
        el("td", {}, el("a", { href: `/runs/${r.key}`, class: "mono" }, r.name)),
        el("td", {}, r.scenario || "–"),
        el("td", {}, r.policy || "–"),
        el("td", {}, el("span", { class: `badge ${r.outcome}` }, r.outcome || "–")),
        el("td", { class: "num" }, fmtDuration(r.rollout_duration_s)),
        el("td", { class: "num" }, `${fmtNum(r.latency_p99_s)} s`),
        el("td", { class: "num" }, `${fmtNum(r.ttft_p99_s)} s`),
        el("td", { class: "num" }, r.cost_usd === undefined ? "–" : `$${fmtNum(r.cost_usd)}`),
      )))
    : el("tbody", {}, el("tr", {}, el("td", { colspan: 8, class: "empty" },
        "No simulated run found under out/, reports/ or the folders given to `rollout ui`.")));
  return el("section", {}, el("h2", {}, "Simulated runs"), el("div", { class: "tablewrap" }, el("table", { id: "runs" },
    el("thead", {}, el("tr", {}, ["Run", "Scenario", "Policy", "Outcome", "Rollout", "p99 latency", "p99 TTFT", "GPU cost"]
      .map((h, i) => el("th", { class: i >= 4 ? "num" : null }, h)))),
    body)));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- charts ----------------------------------------------------------------------------------

// Chart specs: each series reads one value from a sample; `pred` series read the overlay.
function chartSpecs(names, hasLatency, hasOverlay) {
  const replicas = [];
  for (const role of ROLES) {
    if (!names[role]) continue;
    replicas.push(
      { label: `${names[role]} ready`, get: (s) => s.replicas?.[role]?.ready, stroke: COLOR[role], width: 2 },
      { label: `${names[role]} starting`, get: (s) => s.replicas?.[role]?.starting, stroke: COLOR[role], width: 1.5, dash: [5, 4] },
      { label: `${names[role]} draining`, get: (s) => s.replicas?.[role]?.draining, stroke: COLOR[role], width: 1.5, dash: [1, 3] },
    );
  }
  replicas.push({ label: "GPUs in use", get: (s) => s.gpus, stroke: COLOR.gpus, width: 2.5, alpha: 0.55 });
  const weight = [{ label: `weight on ${names.candidate}`, get: (s) => s.weight, stroke: COLOR.weight, width: 2, fill: "rgba(232,119,46,.12)" }];
  const latency = [], ttft = [];
  for (const role of ROLES) {
    if (!names[role]) continue;
    latency.push({ label: `${names[role]} p99`, get: (s) => s.latency_p99?.[role], stroke: COLOR[role], width: 2, points: true, linear: true });
    ttft.push({ label: `${names[role]} p99`, get: (s) => s.ttft_p99?.[role], stroke: COLOR[role], width: 2, points: true, linear: true });
  }
  if (hasOverlay) {
    for (const role of ROLES) {
      if (!names[role]) continue;
      replicas.push({ label: `${names[role]} ready, predicted`, get: (s) => s.replicas?.[role]?.ready, stroke: COLOR[role], width: 2, dash: [10, 5], alpha: 0.5, pred: true });
      latency.push({ label: `${names[role]} p99, predicted`, get: (s) => s.latency_p99?.[role], stroke: COLOR[role], width: 1.5, dash: [8, 4], alpha: 0.6, pred: true, linear: true });
      ttft.push({ label: `${names[role]} p99, predicted`, get: (s) => s.ttft_p99?.[role], stroke: COLOR[role], width: 1.5, dash: [8, 4], alpha: 0.6, pred: true, linear: true });
    }
    replicas.push({ label: "GPUs, predicted", get: (s) => s.gpus, stroke: COLOR.gpus, width: 2, dash: [10, 5], alpha: 0.45, pred: true });
    weight.push({ label: "weight, predicted", get: (s) => s.weight, stroke: COLOR.weight, width: 2, dash: [10, 5], alpha: 0.6, pred: true });
  }
  const charts = [
    { id: "replicas", title: "Replicas per version and GPUs", series: replicas, unit: "" },
    { id: "weight", title: "Traffic to the candidate", series: weight, unit: "", range: [0, 1] },
  ];
  if (hasLatency) {
    charts.push({ id: "latency", title: "Latency p99 per version", sub: "s, sliding window", series: latency, unit: "s" });
    charts.push({ id: "ttft", title: "Time to first token p99 per version", sub: "s, first byte through the router", series: ttft, unit: "s" });
  }
  return charts;
}

// Marks drawn as vertical lines: steps, controls, guard events and the end.
function markOf(e) {
  const k = e.kind;
  if (k === "step_completed") return { color: "#8a94a0", dash: [2, 3], label: e.direction === "backward" ? `↩${e.step}` : `step ${e.step}` };
  if (k === "control_received") return { color: "#6b46c1", dash: [4, 3], label: controlName(e.control) };
  if (k === "control_applied") return { color: "#6b46c1", dash: [], label: `${controlName(e.control)} ✓` };
  if (k === "control_ignored") return { color: "#6b46c1", dash: [1, 3], label: `${controlName(e.control)} ✗` };
  if (k === "transition" && e.stage === "rollback") return { color: "#c93838", dash: [], label: "rollback" };
  if (k.includes("guard")) return { color: "#c93838", dash: [6, 3], label: k.replace(/_/g, " ") };
  if (k === "finished") return { color: e.outcome === "succeeded" ? "#2f8f4e" : "#c93838", dash: [], label: e.outcome };
  return null;
}

function marksPlugin(getMarks) {
  return {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx, { left, top, width, height } = u.bbox, dpr = devicePixelRatio || 1;
        ctx.save();
        ctx.font = `${11 * dpr}px system-ui, sans-serif`;
        const rowEnds = [-1e9, -1e9, -1e9]; // labels go on the first row with room, else none
        for (const m of getMarks()) {
          const x = Math.round(u.valToPos(m.x, "x", true));
          if (x < left || x > left + width) continue;
          ctx.strokeStyle = m.color;
          ctx.lineWidth = 1 * dpr;
          ctx.setLineDash(m.dash.map((d) => d * dpr));
          ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
          const row = rowEnds.findIndex((end) => x + 3 * dpr > end);
          if (row < 0) continue;
          const w = ctx.measureText(m.label).width, y = top + (12 + 12 * row) * dpr;
          rowEnds[row] = x + 3 * dpr + w + 6 * dpr;
          ctx.fillStyle = "rgba(255,255,255,.85)"; // keep the label legible over the lines
          ctx.fillRect(x + 2 * dpr, y - 10 * dpr, w + 2 * dpr, 12 * dpr);
          ctx.fillStyle = m.color;
          ctx.fillText(m.label, x + 3 * dpr, y);
        }
        ctx.restore();
      }],
    },
  };
}

// Rows for uPlot from samples: x = seconds since the rollout started. A stepped series holds
// its value until it changes, so it is carried forward between its first and last sample.
function table(samples, t0, specs) {
  const xs = samples.map((s) => s.t - t0);
  return [xs, ...specs.map((sp) => {
    const ys = samples.map((s) => { const v = sp.get(s); return v === undefined ? null : v; });
    if (!sp.linear) {
      const last = ys.findLastIndex((v) => v !== null);
      for (let i = 1; i <= last; i++) if (ys[i] === null) ys[i] = ys[i - 1];
    }
    return ys;
  })];
}

class Charts {
  constructor(root) {
    this.root = root;
    this.plots = [];
    this.signature = "";
    this.marks = [];
    window.addEventListener("resize", () => this.plots.forEach((p) => p.setSize(this.size())));
  }

  size() { return { width: Math.max(320, this.root.clientWidth - 26), height: 200 }; }

  // real: {samples, t0, names}; pred: same for the overlay, or null; xRange: [lo, hi] or null
  draw(real, pred, events, xRange) {
    // latency is drawn where it was measured (a prediction alone has nothing to compare with)
    const hasLatency = real.samples.some((s) => s.latency_p99 || s.ttft_p99);
    const specs = chartSpecs(real.names, hasLatency, !!pred);
    this.xRange = xRange;
    const signature = JSON.stringify(specs.map((c) => [c.sub, c.series.map((s) => s.label)]));
    this.marks = events.map((e) => { const m = markOf(e); return m && { ...m, x: e.t - real.t0 }; }).filter(Boolean);
    const datas = specs.map((chart) => {
      const mine = chart.series.filter((s) => !s.pred), theirs = chart.series.filter((s) => s.pred);
      const a = table(real.samples, real.t0, mine);
      if (!pred) return a;
      const b = table(pred.samples, pred.t0, theirs);
      return uPlot.join([a, b]);
    });
    if (signature !== this.signature) {
      this.signature = signature;
      this.plots.forEach((p) => p.destroy());
      this.root.replaceChildren();
      this.plots = specs.map((chart, i) => this.make(chart, datas[i]));
    } else {
      this.plots.forEach((p, i) => p.setData(datas[i], !p.zoomed));
    }
    this.plots.forEach((p) => this.focus(p));
    ui.drawn += 1;
  }

  make(chart, data) {
    const box = el("div", { class: "chart", id: `chart-${chart.id}` },
      el("h3", {}, chart.title, chart.sub ? el("span", { class: "muted" }, ` · ${chart.sub}`) : null));
    this.root.append(box);
    const ordered = [...chart.series.filter((s) => !s.pred), ...chart.series.filter((s) => s.pred)];
    const stepped = uPlot.paths.stepped({ align: 1 });
    const opts = {
      ...this.size(),
      cursor: { sync: { key: "rollout" } },
      scales: { x: { time: false }, y: chart.range ? { range: chart.range } : { range: (u, lo, hi) => [0, Math.max(1, hi * 1.08)] } },
      axes: [
        { values: (u, vals) => vals.map(fmtRel), grid: { stroke: "#eef0f3" } },
        { grid: { stroke: "#eef0f3" }, size: 52, values: chart.id === "weight" ? (u, vals) => vals.map((v) => `${Math.round(v * 100)}%`) : undefined },
      ],
      series: [
        { label: "t", value: (u, v) => (v === null ? "–" : fmtRel(v)) },
        ...ordered.map((s) => ({
          label: s.label,
          stroke: s.alpha ? hexAlpha(s.stroke, s.alpha) : s.stroke,
          width: s.width,
          dash: s.dash,
          fill: s.fill,
          spanGaps: true,
          points: { show: !!s.points, size: 4 },
          paths: s.linear ? undefined : stepped,
          value: (u, v) => (v === null || v === undefined ? "–" : chart.id === "weight" ? pct(v) : chart.unit ? `${Number(v).toFixed(2)} s` : Number(v).toFixed(0)),
        })),
      ],
      plugins: [marksPlugin(() => this.marks)],
      hooks: { setSelect: [(u) => { if (u.select.width > 0) u.zoomed = true; }] },
    };
    const plot = new uPlot(opts, data, box);
    plot.over.addEventListener("dblclick", () => { plot.zoomed = false; this.focus(plot); });
    return plot;
  }

  // Show xRange, unless the person dragged to zoom (a double click zooms back out).
  focus(plot) {
    if (this.xRange && !plot.zoomed) plot.setScale("x", { min: this.xRange[0], max: this.xRange[1] });
  }
}

function hexAlpha(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${a})`;
}

// ---- the history table -----------------------------------------------------------------------

function details(e) {
  return Object.entries(e).filter(([k]) => k !== "t" && k !== "kind").map(([k, v]) => {
    if (typeof v === "number") v = Number.isInteger(v) ? v : Number(v.toPrecision(4));
    else if (v && typeof v === "object") v = Object.entries(v).map(([a, b]) => `${a}=${b}`).join(",");
    return `${k}=${v}`;
  }).join("  ");
}

function historyRow(e, t0, clock) {
  return el("tr", {},
    el("td", { class: "mono" }, clock ? fmtClock(e.t) : fmtRel(e.t - t0)),
    el("td", { class: "num mono" }, clock ? `+${fmtRel(e.t - t0)}` : ""),
    el("td", {}, el("span", { class: `kind ${e.kind}` }, e.kind)),
    el("td", { class: "mono" }, details(e)));
}

function historySection(id) {
  return el("section", {}, el("h2", {}, "History ", el("span", { class: "muted", id: `${id}-count` }, "")),
    el("div", { class: "tablewrap history" }, el("table", { id },
      el("thead", {}, el("tr", {}, el("th", {}, "Time"), el("th", { class: "num" }, "Since start"), el("th", {}, "Event"), el("th", {}, "Details"))),
      el("tbody", {}))));
}

// ---- one rollout -----------------------------------------------------------------------------

class RolloutView {
  constructor(id) {
    this.id = id;
    this.samples = [];
    this.events = [];
    this.offset = { samples: 0, events: 0 };
    this.status = null;
    this.now = null;
    this.overlay = null;
    this.built = false;
  }

  get t0() {
    const started = this.events.find((e) => e.kind === "rollout_started");
    return started ? started.t : this.status.created_at;
  }

  async run() {
    $("#crumbs").replaceChildren(el("a", { href: "/" }, "rollouts"), " / ", el("span", { class: "mono" }, this.id));
    const wanted = new URLSearchParams(location.search).get("overlay");
    for (;;) {
      let ok = true;
      try {
        await this.poll();
        if (!this.built) {
          this.build();
          if (wanted) await this.setOverlay(wanted);
        }
        this.render();
        if (ui.loadMs === null) ui.loadMs = performance.now();
        setLive(true, this.ended ? "ended · history complete" : `live · updated ${fmtClock(Date.now() / 1000)}`);
      } catch (e) {
        ok = false;
        console.error(e);
        setLive(false, "cannot reach rollout ui; retrying");
      }
      if (ok && this.ended) return;
      await sleep(POLL_MS);
    }
  }

  get ended() {
    const s = this.status;
    return s && ["succeeded", "cancelled", "failed"].includes(s.state) && !s.controller.running;
  }

  async poll() {
    const q = `samples=${this.offset.samples}&events=${this.offset.events}`;
    const data = await getJSON(`/api/rollouts/${encodeURIComponent(this.id)}?${q}`);
    if (data.reset) { this.samples = []; this.events = []; this.newEvents = []; }
    this.samples.push(...data.samples);
    this.events.push(...data.events);
    this.newEvents = data.reset ? this.events.slice() : data.events;
    this.offset = data.offset;
    this.status = data.status;
    this.now = data.now;
    this.controls = data.controls;
    this.fresh = data.samples.length > 0;
    ui.polls += 1;
  }

  build() {
    const s = this.status;
    const main = $("#main");
    this.msg = el("span", { id: "ctl-msg" });
    const buttons = CONTROLS.map(([c, label]) => el("button", {
      id: `btn-${c}`, "data-control": c, class: c === "force_cancel" ? "danger" : null,
      onclick: () => this.send(c),
    }, label));
    this.select = el("select", { id: "overlay", onchange: () => this.setOverlay(this.select.value) },
      el("option", { value: "" }, "compare with a simulated run…"));
    main.replaceChildren(
      el("div", { class: "head" },
        el("div", {},
          el("h1", {}, el("span", { class: "mono", style: "font-size:17px" }, this.id), " ", el("span", { id: "state-wrap" })),
          el("div", { class: "meta" }, `${s.app}: ${s.from_version || "nothing"} → ${s.to_version} · ${s.kind || "rollout"} · policy ${s.policy || "?"}`)),
        el("div", { class: "controls" }, buttons)),
      el("div", { class: "stats", id: "stats" }),
      el("div", { class: "waiting", id: "waiting" }),
      el("div", { class: "toolbar" }, el("div", {}, this.msg), this.select),
      el("div", { class: "charts", id: "charts" }),
      el("div", { style: "height:18px" }),
      historySection("history"),
    );
    this.charts = new Charts($("#charts"));
    this.built = true;
    getJSON("/api/rollouts").then((d) => {
      for (const r of d.runs) this.select.append(el("option", { value: r.key }, `${r.name} (${r.policy || "?"})`));
      if (this.overlay) this.select.value = this.overlay.key;
    });
  }

  async setOverlay(key) {
    const url = new URL(location.href);
    if (!key) { this.overlay = null; url.searchParams.delete("overlay"); }
    else {
      this.overlay = await getJSON(`/api/runs/${encodeURIComponent(key)}`);
      url.searchParams.set("overlay", key);
    }
    history.replaceState(null, "", url);
    this.render();
  }

  render() {
    const s = this.status, now = this.now;
    $("#state-wrap").replaceChildren(badge(s.state));
    const stat = (label, value, sub, id) => el("div", { class: "stat" }, el("div", { class: "label" }, label),
      el("div", { class: "value", id }, value), sub ? el("div", { class: "sub" }, sub) : null);
    const reps = (version) => {
      const n = s.replicas[version];
      if (!n) return null;
      return stat(`${version} replicas`, `${n.ready ?? 0} ready`,
        `${n.starting ?? 0} starting · ${n.draining ?? 0} draining · target ${n.target ?? "–"}` + (n.pending_gpu ? ` · ${n.pending_gpu} wait for a GPU` : ""));
    };
    const ctl = s.controller || {};
    const end = s.finished_at || (this.ended ? s.updated_at : Date.now() / 1000);
    $("#stats").replaceChildren(
      stat("Step", `${s.step} / ${s.steps ?? "?"}`, `stage ${s.stage || "?"}`, "step"),
      stat(`Weight on ${s.to_version}`, pct(s.candidate_weight), null, "weight"),
      s.from_version ? reps(s.from_version) : null,
      reps(s.to_version),
      stat("GPUs in use", fmtNum(now.gpus, now.gpus % 1 ? 1 : 0), "by this model's replicas"),
      stat("Duration", fmtDuration(end - this.t0), `started ${fmtDate(this.t0)}`),
      stat("Controller", ctl.running ? "running" : "not running",
        ctl.running ? `pid ${ctl.pid}` : (this.ended ? "rollout ended" : "`rollout recover` resumes it")),
    );
    $("#waiting").textContent = s.waiting ? `waiting: ${s.waiting}` : "";
    for (const [c] of CONTROLS) $(`#btn-${c}`).disabled = !this.controls[c] || this.sending;

    const names = { candidate: s.to_version };
    if (s.from_version) names.current = s.from_version;
    const last = this.samples[this.samples.length - 1];
    const tail = now.t > 0 && (!last || now.t >= last.t) ? [now] : []; // extend lines to the last observation
    const real = { samples: [...this.samples, ...tail], t0: this.t0, names };
    const pred = this.overlay && { samples: this.overlay.samples, t0: this.overlay.t0 };
    // focus on the rollout: a simulated run's hour of traffic around it stays out of view
    const realEnd = real.samples.length ? real.samples[real.samples.length - 1].t - real.t0 : 0;
    const predEnd = pred ? rolloutEnd(this.overlay) : 0;
    const span = Math.max(10, realEnd, predEnd);
    const xRange = pred ? [-0.06 * span, span * 1.03] : null;
    this.charts.draw(real, pred, this.events, xRange);

    const body = $("#history tbody");
    if (!body.dataset.t0) body.dataset.t0 = this.t0;
    for (const e of this.newEvents || []) body.prepend(historyRow(e, this.t0, true));
    this.newEvents = [];
    $("#history-count").textContent = `${this.events.length} events`;
    if (this.fresh) {
      ui.lags.push(Date.now() / 1000 - Math.max(last.t, now.t));
      this.fresh = false;
    }
  }

  async send(control) {
    if (control === "force_cancel" && !(await confirmForce())) return;
    this.sending = true;
    this.render();
    try {
      const r = await fetch(`/api/rollouts/${encodeURIComponent(this.id)}/controls/${control}`, {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": CSRF },
      });
      const body = await r.json();
      this.msg.className = r.ok ? "ok" : "err";
      this.msg.textContent = r.ok ? body.message : body.error;
    } catch (e) {
      this.msg.className = "err";
      this.msg.textContent = `could not send ${controlName(control)}: ${e.message}`;
    }
    this.sending = false;
    try { await this.poll(); this.render(); } catch (e) { /* the next poll retries */ }
  }
}

function confirmForce() {
  const dialog = $("#confirm");
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
    dialog.showModal();
  });
}

// ---- one simulated run -----------------------------------------------------------------------

// When a simulated run's rollout ended, in seconds after it started (drag on a chart to zoom).
function rolloutEnd(run) {
  const end = run.summary.rollout_end_s;
  if (typeof end === "number" && isFinite(end)) return end - run.t0;
  const finished = run.events.find((e) => e.kind === "finished");
  return finished ? finished.t - run.t0 : 0;
}

async function runView(key) {
  const run = await getJSON(`/api/runs/${encodeURIComponent(key)}`);
  const s = run.summary;
  $("#crumbs").replaceChildren(el("a", { href: "/" }, "simulated runs"), " / ", el("span", { class: "mono" }, run.name));
  const stat = (label, value, sub) => el("div", { class: "stat" }, el("div", { class: "label" }, label),
    el("div", { class: "value" }, value), sub ? el("div", { class: "sub" }, sub) : null);
  $("#main").replaceChildren(
    el("div", { class: "head" }, el("div", {},
      el("h1", {}, el("span", { class: "mono", style: "font-size:17px" }, run.name), " ", badge(s.outcome || "none")),
      el("div", { class: "meta" }, `simulated · scenario ${s.scenario || "?"} · policy ${s.policy || "?"} · seed ${s.seed ?? "?"}`))),
    el("div", { class: "stats" },
      stat("Rollout", fmtDuration(s.rollout_duration_s), `${s.steps ?? "?"} steps`),
      stat("p99 latency", `${fmtNum(s.latency_p99_s)} s`, `during the rollout ${fmtNum(s.latency_p99_rollout_s)} s`),
      stat("p99 TTFT", `${fmtNum(s.ttft_p99_s)} s`, `during the rollout ${fmtNum(s.ttft_p99_rollout_s)} s`),
      stat("Requests", s.requests ?? "–", `${s.dropped ?? 0} dropped · ${s.failed ?? 0} failed`),
      stat("Peak GPUs", s.peak_gpus ?? "–", `min ready ${s.min_ready_replicas ?? "–"}`),
      stat("GPU cost", s.cost_usd === undefined ? "–" : `$${fmtNum(s.cost_usd)}`, `${fmtNum(s.gpu_hours)} GPU-hours`)),
    el("div", { class: "charts", id: "charts" }),
    el("div", { style: "height:18px" }),
    historySection("history"));
  const charts = new Charts($("#charts"));
  const end = rolloutEnd(run), pad = 0.3 * Math.max(10, end);
  const xRange = s.outcome && s.outcome !== "none" ? [-pad, end + pad] : null;
  const names = { current: "current", candidate: "candidate" };
  charts.draw({ samples: run.samples, t0: run.t0, names }, null, run.events, xRange);
  const body = $("#history tbody");
  for (const e of [...run.events].reverse()) body.append(historyRow(e, run.t0, false));
  $("#history-count").textContent = `${run.events.length} events, times since the rollout started`;
  setLive(true, "simulated run");
  ui.loadMs = performance.now();
}

// ---- start -----------------------------------------------------------------------------------

const path = decodeURIComponent(location.pathname);
if (KIND === "rollout") new RolloutView(path.replace(/^\/rollouts\//, "")).run();
else if (KIND === "run") runView(path.replace(/^\/runs\//, "")).catch((e) => setLive(false, String(e)));
else listView();
