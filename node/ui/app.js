// Hearth dashboard: polls GET /v1/overview and draws it. Read-only; no library, nothing fetched from
// elsewhere (the page is served under Content-Security-Policy default-src 'self').
// Every value from the node goes in through textContent or an attribute, never as HTML: job ids and
// failure messages come from requesters.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role" || key === "title") {
      node.setAttribute(key, String(value));
    }
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function replace(id, ...children) {
  document.getElementById(id).replaceChildren(...children);
}

function row(cells) {
  return el("tr", {}, ...cells);
}

function cell(text, cls) {
  return el("td", { class: cls || "", text: String(text) });
}

function fmtDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function fmtMemory(mb) {
  return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GiB` : `${mb} MiB`;
}

function fmtCpus(cpus) {
  return Number.isInteger(cpus) ? String(cpus) : cpus.toFixed(2);
}

function drawHeader(doc) {
  const node = doc.node;
  document.getElementById("node-name").textContent = node.name;
  document.getElementById("node-did").textContent = node.did;
  const status = document.getElementById("status");
  const [text, cls] = !node.ready ? ["not ready", "bad"] : node.paused ? ["paused", "warn"] : ["ready", "ok"];
  status.textContent = text;
  status.className = `pill ${cls}`;
  const at = new Date(doc.generated_at * 1000);
  document.getElementById("updated").textContent = `updated ${at.toLocaleTimeString()}`;
}

function drawRunning(doc) {
  const jobs = doc.jobs;
  document.getElementById("queued").textContent = `· ${jobs.running.length} running, ${jobs.queued} queued`;
  if (!jobs.running.length) {
    replace("running", el("p", { class: "empty", text: "No job is running." }));
    return;
  }
  const now = doc.generated_at;
  replace(
    "running",
    ...jobs.running.map((job) => {
      const pct = job.percent == null ? null : Math.max(0, Math.min(100, job.percent));
      const fill = el("div", { class: "fill" });
      fill.style.width = `${pct == null ? 0 : pct}%`;
      return el(
        "div",
        { class: "job", "data-job": job.id },
        el(
          "div",
          { class: "job-line" },
          el("code", { class: "job-id", text: job.id }),
          el("span", { class: "muted", text: job.job_id }),
          el("span", { text: job.kind }),
          el("span", { class: "stage", text: job.stage }),
          el("span", { class: "muted", text: `attempt ${job.attempt} · ${fmtDuration(now - job.started_at)}` }),
          el("span", { class: "pct", text: pct == null ? "–" : `${pct.toFixed(1)}%` })
        ),
        el(
          "div",
          { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct ?? 0 },
          fill
        )
      );
    })
  );
}

function meter(used, total) {
  const inner = el("div");
  inner.style.width = `${total > 0 ? Math.min(100, (100 * used) / total) : 0}%`;
  return el("div", { class: "meter" }, inner);
}

function drawCapacity(doc) {
  const res = doc.capacity.resources;
  const lines = [
    ["CPU", fmtCpus(res.free.cpus), fmtCpus(res.total.cpus), res.used.cpus, res.total.cpus],
    ["Memory", fmtMemory(res.free.memory_mb), fmtMemory(res.total.memory_mb), res.used.memory_mb, res.total.memory_mb],
    ["GPUs", res.free.gpus, res.total.gpus, res.used.gpus, res.total.gpus],
  ];
  replace(
    "capacity",
    row([el("th", { text: "" }), el("th", { text: "free" }), el("th", { text: "total" }), el("th", { text: "in use" })]),
    ...lines.map(([name, free, total, used, all]) =>
      row([cell(name), cell(free, "num"), cell(total, "num"), el("td", {}, meter(used, all))])
    )
  );
  const m = doc.capacity.machine;
  const gpus = m.gpus.length ? m.gpus.map((g) => g.name).join(", ") : "no GPU";
  document.getElementById("machine").textContent =
    `${m.cpu_count} CPUs · ${fmtMemory(m.memory_total_mb)} RAM · disk ${fmtMemory(m.disk.free_mb)} free · ${gpus} · ` +
    `utilisation ${(100 * res.utilisation).toFixed(0)}%`;
  const models = doc.capacity.models;
  replace(
    "models",
    models.length
      ? el("p", {}, el("span", { class: "muted", text: "Models: " }), models.map((x) => x.name).join(", "))
      : el("p", { class: "muted", text: "No models declared." })
  );
}

// Shown only for a node in front of a cluster ([cluster]); an older node's overview has no "cluster" at all.
function drawWorkers(doc) {
  const cluster = doc.cluster;
  document.getElementById("workers-card").hidden = !cluster;
  if (!cluster) return;
  const dead = cluster.workers.length - cluster.alive;
  document.getElementById("workers-summary").textContent =
    `· ${cluster.engine} at ${cluster.address} · ${cluster.alive} alive` +
    (dead ? `, ${dead} dead` : "") +
    ` · ${cluster.lost_runs} run(s) lost`;
  if (!cluster.workers.length) {
    replace("workers", el("tr", {}, el("td", { class: "empty", text: "No worker has joined the cluster." })));
    return;
  }
  replace(
    "workers",
    row(["name", "alive", "CPUs", "memory", "GPUs", "models", "running", "lost"].map((h) => el("th", { text: h }))),
    ...cluster.workers.map((w) =>
      el(
        "tr",
        { "data-worker": w.name, title: `${w.address} · node ${w.node_id}` },
        cell(w.name),
        cell(w.alive ? "alive" : "dead", w.alive ? "ok-text" : "bad-text"),
        cell(fmtCpus(w.cpus), "num"),
        cell(fmtMemory(w.memory_mb), "num"),
        cell(w.gpus, "num"),
        el("td", { class: "num", title: w.models.join("\n") }, String(w.models.length)),
        cell(w.running, "num"),
        cell(w.lost, w.lost ? "num bad-text" : "num")
      )
    )
  );
}

function drawFailures(doc) {
  const domains = Object.entries(doc.failures.by_domain);
  if (!domains.length) {
    replace("failures", el("tr", {}, el("td", { class: "empty", text: "No failed jobs." })));
    return;
  }
  domains.sort((a, b) => b[1].count - a[1].count);
  replace(
    "failures",
    row([el("th", { text: "domain" }), el("th", { text: "jobs" }), el("th", { text: "codes" })]),
    ...domains.map(([domain, info]) => {
      const codes = Object.entries(info.codes).map(([code, n]) => `${code || "?"} ×${n}`).join(", ");
      return row([cell(domain, "bad-text"), cell(info.count, "num"), cell(codes)]);
    })
  );
}

function drawStates(doc) {
  const states = Object.entries(doc.jobs.by_state).filter(([, n]) => n > 0);
  if (!states.length) {
    replace("states", el("tr", {}, el("td", { class: "empty", text: "No jobs yet." })));
    return;
  }
  replace("states", ...states.map(([state, n]) => row([cell(state, `state-${state}`), cell(n, "num")])));
}

function periodLabel(start, period) {
  const d = new Date(start * 1000);
  return period === "day"
    ? d.toLocaleDateString([], { month: "short", day: "numeric" })
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function drawEarnings(doc) {
  const e = doc.earnings;
  const gas = Object.values(e.gas_wei).reduce((a, b) => a + b, 0);
  document.getElementById("earned").textContent =
    `· ${e.earned} ${e.currency.toUpperCase()} earned in all` + (doc.node.payments ? ` · gas ${gas} wei` : " · payments off");
  const points = e.series.points;
  const width = Math.max(320, document.getElementById("chart").clientWidth || 960);
  const height = 180;
  const left = 56;
  const bottom = 22;
  const top = 10;
  const plotW = width - left - 8;
  const plotH = height - top - bottom;
  const max = Math.max(0, ...points.map((p) => p.earned_units));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  chart.append(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: width - 8, y2: top + plotH }));
  chart.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotH }));
  const scale = 10 ** e.decimals;
  const yMax = svg("text", { x: left - 6, y: top + 10, "text-anchor": "end" });
  yMax.textContent = max ? String(max / scale) : "0";
  const unit = svg("text", { x: left - 6, y: top + 24, "text-anchor": "end" });
  unit.textContent = e.currency.toUpperCase();
  chart.append(unit);
  chart.append(yMax);
  const step = plotW / points.length;
  points.forEach((p, i) => {
    const h = max ? (plotH * p.earned_units) / max : 0;
    const bar = svg("rect", {
      x: (left + i * step + 1).toFixed(1),
      y: (top + plotH - h).toFixed(1),
      width: Math.max(1, step - 2).toFixed(1),
      height: h.toFixed(1),
      fill: "#e0a030",
    });
    const tip = svg("title");
    tip.textContent = `${periodLabel(p.start, e.series.period)}: ${p.earned} ${e.currency.toUpperCase()}, ${p.jobs} job(s)`;
    bar.append(tip);
    chart.append(bar);
  });
  const ends = { 0: "start", [points.length - 1]: "end" };
  for (const i of [0, Math.floor(points.length / 2), points.length - 1]) {
    const x = i === 0 ? left : i === points.length - 1 ? left + plotW : left + i * step + step / 2;
    const label = svg("text", { x: x.toFixed(1), y: height - 6, "text-anchor": ends[i] || "middle" });
    label.textContent = periodLabel(points[i].start, e.series.period);
    chart.append(label);
  }
  if (!max) {
    const none = svg("text", { x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle" });
    none.textContent = `no settled payment in the last ${points.length} ${e.series.period}s`;
    chart.append(none);
  }
  replace("chart", chart);
}

function drawRecent(doc) {
  const jobs = doc.jobs.recent;
  if (!jobs.length) {
    replace("recent", el("tr", {}, el("td", { class: "empty", text: "No jobs yet." })));
    return;
  }
  replace(
    "recent",
    row(["id", "job", "kind", "state", "price", "age", "failure"].map((h) => el("th", { text: h }))),
    ...jobs.map((j) =>
      row([
        el("td", {}, el("code", { text: j.id })),
        cell(j.job_id),
        cell(j.kind),
        cell(j.state, `state-${j.state}`),
        cell(j.price == null ? "–" : j.price, "num"),
        cell(fmtDuration(doc.generated_at - j.created_at), "num"),
        cell(j.failure ? `${j.failure.domain}/${j.failure.code || "?"}` : ""),
      ])
    )
  );
}

function draw(doc) {
  drawHeader(doc);
  drawRunning(doc);
  drawWorkers(doc);
  drawCapacity(doc);
  drawFailures(doc);
  drawStates(doc);
  drawEarnings(doc);
  drawRecent(doc);
}

async function poll() {
  try {
    const response = await fetch("/v1/overview?period=hour", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    draw(await response.json());
  } catch (err) {
    const status = document.getElementById("status");
    status.textContent = `unreachable (${err.message})`;
    status.className = "pill bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
