// memplan serve: the page. Every control change asks /api/plan (and, on the second tab,
// /api/fit and /api/recommend) and draws the answer: the JSON `memplan <command> --json` prints.
"use strict";

const GIB = 2 ** 30;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const COLORS = [
  "#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d",
  "#e15759", "#ff9d9a", "#79706e", "#bab0ac", "#d37295",
];
let choices = null;
let config = null; // an uploaded config.json: {name, text}
let asked = 0; // the latest question; older answers are dropped

function gib(bytes) {
  return (bytes / GIB).toLocaleString("en-US", {
    minimumFractionDigits: 2, maximumFractionDigits: 2,
  });
}

function el(tag, attrs = {}, text = "") {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function fillSelect(select, values, blank) {
  if (blank) select.append(el("option", { value: "" }, blank));
  for (const v of values) select.append(el("option", { value: v }, v));
}

// ---------------------------------------------------------------- the question

function numberOrText(input) {
  const text = input.value.trim();
  if (text === "") return undefined; // the method's default
  return /^-?\d+$/.test(text) ? Number(text) : text; // the server names a bad value
}

function question() {
  const body = { setup: {}, parallel: {} };
  if (config) body.config = config;
  else body.model = $("model").value.trim();
  for (const node of document.querySelectorAll("[data-setup]")) {
    let value = node.type === "number" ? numberOrText(node) : node.value;
    if (value === "" || value === undefined) continue;
    if (value === "true" || value === "false") value = value === "true";
    body.setup[node.dataset.setup] = value;
  }
  for (const node of document.querySelectorAll("[data-parallel]")) {
    const value = node.type === "number" ? numberOrText(node) : node.value;
    if (value !== "" && value !== undefined) body.parallel[node.dataset.parallel] = value;
  }
  const sharding = $("sharding").value;
  body.parallel.sharding = sharding.startsWith("fsdp") ? "fsdp" : "deepspeed";
  body.parallel.zero_stage = Number(sharding.replace("fsdp-", ""));
  const gpu = $("gpu").value;
  if (gpu === "capacity") body.gpu = $("capacity").value.trim();
  else if (gpu) body.gpu = gpu;
  return body;
}

async function ask(kind, body) {
  const response = await fetch(`/api/${kind}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  let payload;
  try {
    payload = await response.json();
  } catch {
    payload = { error: `the server answered ${response.status} without JSON`, field: null };
  }
  return { ok: response.ok, payload };
}

function clearErrors() {
  for (const node of document.querySelectorAll(".error")) node.textContent = "";
  for (const node of document.querySelectorAll(".bad")) node.classList.remove("bad");
}

function showError(payload) {
  const field = payload.field || "";
  const spot = document.querySelector(`.error[data-for="${CSS.escape(field)}"]`) || $("error");
  spot.textContent = payload.error;
  const control = spot.previousElementSibling;
  if (control && spot !== $("error")) control.classList.add("bad");
}

// ---------------------------------------------------------------- the plan tab

const VERDICT_WORDS = {
  fits: "FITS",
  borderline: "BORDERLINE",
  "fits only by paging": "FITS ONLY BY PAGING",
  "does not fit": "DOES NOT FIT",
};

function verdictText(r) {
  if (r.verdict === null) return `per-GPU peak ${gib(r.device_bytes)} GiB (no GPU chosen)`;
  const of = `${gib(r.device_bytes)} of ${gib(r.gpu_capacity_bytes)} GiB`;
  const word = VERDICT_WORDS[r.verdict];
  if (r.verdict === "fits") return `${word} on ${r.gpu}: ${of}, ${gib(r.margin_bytes)} GiB to spare`;
  if (r.verdict === "borderline") {
    const pct = Math.round(100 * r.safety_fraction);
    return `${word} on ${r.gpu}: ${of}, ${gib(r.margin_bytes)} GiB to spare, less than the ${pct}% safety margin`;
  }
  if (r.verdict === "fits only by paging") {
    return `${word} on ${r.gpu}: ${of}; ${gib(r.paged_out_bytes)} of ${gib(r.paged_bytes)} GiB paged optimizer state must move to host memory`;
  }
  return `${word} on ${r.gpu}: needs ${of}, ${gib(-r.margin_bytes)} GiB short`;
}

function segments(r) {
  const labels = choices.category_labels;
  const parts = Object.entries(labels)
    .filter(([key]) => r.breakdown_bytes[key])
    .map(([key, label]) => [label, r.breakdown_bytes[key]]);
  parts.push(["allocator overhead", r.allocator_overhead_bytes]);
  parts.push(["CUDA context", r.cuda_context_bytes]);
  if (r.communicator_bytes) parts.push(["NCCL communicators", r.communicator_bytes]);
  if (r.paged_bytes) parts.push(["paged optimizer state", r.paged_bytes]);
  return parts.filter(([, bytes]) => bytes > 0);
}

function drawBar(r) {
  const width = 760, height = 44, top = 16, parts = segments(r);
  const capacity = r.gpu_capacity_bytes;
  const scale = Math.max(r.device_bytes, capacity || 0) * 1.04;
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${top + height + 18}`, role: "img",
    "aria-label": "memory at the peak, stacked by category" });
  let x = 0;
  parts.forEach(([label, bytes], i) => {
    const w = (width * bytes) / scale;
    const rect = el("svg:rect", { x, y: top, width: Math.max(w, 0.5), height,
      fill: COLORS[i % COLORS.length] });
    rect.append(el("svg:title", {}, `${label}: ${gib(bytes)} GiB`));
    svg.append(rect);
    x += w;
  });
  svg.append(el("svg:text", { x: Math.min(x, width), y: top + height + 14,
    "text-anchor": x > width / 2 ? "end" : "start", class: "axis" },
    `device total ${gib(r.device_bytes)} GiB`));
  if (capacity) {
    const cx = (width * capacity) / scale;
    svg.append(el("svg:line", { x1: cx, x2: cx, y1: top - 4, y2: top + height + 4,
      class: "capacity" }));
    svg.append(el("svg:text", { x: cx, y: top - 6, "text-anchor": cx > width / 2 ? "end" : "start",
      class: "axis" }, `capacity of ${r.gpu}: ${gib(capacity)} GiB`));
  }
  const legend = el("ul", { class: "legend" });
  parts.forEach(([label, bytes], i) => {
    const item = el("li");
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = COLORS[i % COLORS.length]; // CSSOM: no inline style attribute
    item.append(swatch);
    item.append(document.createTextNode(`${label} ${gib(bytes)} GiB`));
    legend.append(item);
  });
  $("bar").replaceChildren(svg, legend);
}

function drawTimeline(r) {
  const phases = Object.entries(r.phase_peaks_bytes);
  const width = 760, height = 150, gap = 6;
  const top = Math.max(...phases.map(([, b]) => b), r.gpu_capacity_bytes || 0) * 1.12;
  const w = (width - gap * phases.length) / phases.length;
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height + 36}`, role: "img",
    "aria-label": "highest allocated memory in each phase of two steps" });
  phases.forEach(([key, bytes], i) => {
    const [step, phase] = key.split(":");
    const h = (height * bytes) / top;
    const x = i * (w + gap);
    const peak = Number(step) === r.peak_step && phase === r.peak_phase;
    const rect = el("svg:rect", { x, y: height - h, width: w, height: h,
      class: peak ? "phase peak" : "phase" });
    rect.append(el("svg:title", {}, `step ${step} ${phase}: ${gib(bytes)} GiB allocated`));
    svg.append(rect);
    svg.append(el("svg:text", { x: x + w / 2, y: height - h - 4, "text-anchor": "middle",
      class: "axis" }, gib(bytes)));
    svg.append(el("svg:text", { x: x + w / 2, y: height + 14, "text-anchor": "middle",
      class: "axis" }, phase));
    svg.append(el("svg:text", { x: x + w / 2, y: height + 28, "text-anchor": "middle",
      class: "axis dim" }, `step ${step}`));
  });
  if (r.gpu_capacity_bytes) {
    const y = height - (height * r.gpu_capacity_bytes) / top;
    svg.append(el("svg:line", { x1: 0, x2: width, y1: y, y2: y, class: "capacity" }));
    const label = el("svg:text", { x: 2, y: y - 3, class: "axis label" },
      `capacity ${gib(r.gpu_capacity_bytes)} GiB`);
    svg.append(label);
  }
  $("timeline").replaceChildren(svg);
}

function drawPlan(r) {
  const verdict = $("verdict");
  verdict.textContent = verdictText(r);
  verdict.dataset.verdict = r.verdict || "";
  verdict.dataset.deviceGib = gib(r.device_bytes);
  $("accuracy").textContent = r.accuracy || "";
  const s = r.setup;
  const share = ((100 * r.trainable_params) / r.params).toFixed(2);
  $("summary").textContent =
    `${r.model}: ${r.params.toLocaleString("en-US")} parameters, ` +
    `${r.trainable_params.toLocaleString("en-US")} trainable (${share}%); ` +
    `method ${s.method}, ${s.precision}, optimizer ${s.optimizer}, ` +
    `micro-batch ${s.micro_batch_size} x seq ${s.seq_len}; ` +
    `peak in ${r.peak_phase} (step ${r.peak_step}) at ${r.peak_event}`;
  drawBar(r);
  drawTimeline(r);
  const fixes = r.fixes || [];
  $("fixes-box").hidden = r.verdict !== "does not fit";
  $("fixes").replaceChildren(...(fixes.length ? fixes.map((c) => el("li", {},
    `${c.change}: ${gib(c.device_bytes)} GiB on the device (${gib(c.saved_bytes)} GiB less); ` +
    `speed: ${c.speed}; quality: ${c.accuracy}`)) : [el("li", { class: "none" },
    "no single change memplan tries makes it fit on this card: try a larger GPU or more GPUs")]));
  $("assumptions").replaceChildren(...r.assumptions.map((a) => el("li", {}, a)));
}

// ---------------------------------------------------------------- the fit tab

function drawFit(f) {
  const lines = [];
  const at = (b) => (b.largest === null ? "nothing fits" : b.largest.toLocaleString("en-US"));
  lines.push(`largest micro-batch at ${f.given.seq_len} tokens: ${at(f.batch)}`);
  lines.push(`longest sequence at micro-batch ${f.given.micro_batch_size}: ${at(f.seq)}`);
  if (f.batch_paging) {
    lines.push(`by paging the optimizer state: micro-batch ${at(f.batch_paging)}, ` +
      `sequence ${at(f.seq_paging)}`);
  }
  $("fit-summary").textContent = `${f.model} on ${f.gpu.name}: ${lines.join("; ")}`;
  const table = el("table", { class: "fit-map" });
  const head = el("tr");
  head.append(el("th", {}, "batch \\ seq"));
  for (const seq of f.table.seq_lens) head.append(el("th", {}, seq.toLocaleString("en-US")));
  table.append(head);
  f.table.rows.forEach((row, i) => {
    const tr = el("tr");
    tr.append(el("th", {}, String(f.table.batch_sizes[i])));
    for (const cell of row) {
      const kind = cell.fits ? "fits" : cell.by_paging ? "paging" : "no";
      const td = el("td", { class: kind, title: `${kind}: ${gib(cell.peak_bytes)} GiB allocated` },
        gib(cell.peak_bytes));
      tr.append(td);
    }
    table.append(tr);
  });
  const key = el("p", { class: "note" },
    "GiB allocated at the peak; green fits, amber fits only by paging, red does not fit");
  $("fit-map").replaceChildren(table, key);
}

function drawRecommend(r) {
  $("recommend-order").textContent = r.order;
  const thead = $("recommend").tHead;
  const cols = ["#", "GPU", "devices x layout", "GiB per device", "tokens/s", "$ per M tokens"];
  const head = el("tr");
  for (const c of cols) head.append(el("th", {}, c));
  thead.replaceChildren(head);
  const rows = r.rows.filter((row) => row.pick !== null).map((row) => {
    const tr = el("tr");
    const est = row.pick.estimate;
    const cells = [
      String(row.rank), row.display_name, `${row.pick.num_devices} x ${row.pick.layout}`,
      gib(row.pick.device_bytes),
      est ? Math.round(est.tokens_per_second).toLocaleString("en-US") : "-",
      est && est.usd_per_million_tokens !== null ? est.usd_per_million_tokens.toFixed(2) : "-",
    ];
    for (const c of cells) tr.append(el("td", {}, c));
    return tr;
  });
  $("recommend").tBodies[0].replaceChildren(...rows);
}

// ---------------------------------------------------------------- updating

function onFitTab() {
  return $("tab-fit").getAttribute("aria-selected") === "true";
}

async function update() {
  const id = ++asked;
  const body = question();
  $("busy").textContent = "computing...";
  const kinds = ["plan"];
  if (onFitTab()) kinds.push(...(body.gpu ? ["fit"] : []), "recommend");
  let failed = false;
  for (const kind of kinds) {
    const { ok, payload } = await ask(kind, kind === "fit" ? { ...body, table: true } : body);
    if (id !== asked) return; // a newer question was asked meanwhile
    if (kind === "plan") clearErrors();
    if (!ok) {
      showError(payload);
      failed = true;
      break;
    }
    if (kind === "plan") drawPlan(payload);
    if (kind === "fit") drawFit(payload);
    if (kind === "recommend") drawRecommend(payload);
  }
  document.body.dataset.state = failed ? "error" : "answered";
  $("busy").textContent = "";
  if (onFitTab() && !body.gpu) {
    $("fit-summary").textContent = "choose a GPU to see what fits on it";
    $("fit-map").replaceChildren();
  }
}

let timer = null;
function soon() {
  document.body.dataset.state = "asking";
  clearTimeout(timer);
  timer = setTimeout(update, 250);
}

function selectTab(fit) {
  $("tab-plan").setAttribute("aria-selected", String(!fit));
  $("tab-fit").setAttribute("aria-selected", String(fit));
  $("panel-plan").hidden = fit;
  $("panel-fit").hidden = !fit;
  soon();
}

async function readConfig(event) {
  const file = event.target.files[0];
  if (!file) return;
  if (file.size > choices.limits.max_body_bytes) {
    clearErrors();
    showError({ error: `config file ${file.name} is ${file.size.toLocaleString("en-US")} bytes: too large`, field: "config" });
    return;
  }
  config = { name: file.name, text: await file.text() };
  $("config-name").textContent = `using ${file.name}`;
  $("config-clear").hidden = false;
  $("model").disabled = true;
  soon();
}

function useCatalog() {
  config = null;
  $("config").value = "";
  $("config-name").textContent = "";
  $("config-clear").hidden = true;
  $("model").disabled = false;
  soon();
}

async function start() {
  choices = await (await fetch("/api/choices")).json();
  const list = $("model-list");
  for (const m of choices.models) {
    list.append(el("option", { value: m.name }, m.hf_id || ""));
  }
  fillSelect($("stack"), choices.stacks);
  fillSelect($("method"), choices.methods);
  fillSelect($("precision"), choices.precisions, "method's default");
  fillSelect($("quant"), choices.quants, "method's default");
  fillSelect($("optimizer"), choices.optimizers, "method's default");
  fillSelect($("offload"), choices.offloads);
  const gpu = $("gpu");
  for (const g of choices.gpus) {
    gpu.append(el("option", { value: g.name }, `${g.name} (${gib(g.usable_memory_bytes)} GiB)`));
  }
  gpu.append(el("option", { value: "capacity" }, "a capacity..."));
  gpu.value = "rtx-4090";
  gpu.addEventListener("change", () => {
    $("capacity-label").hidden = gpu.value !== "capacity";
  });
  for (const node of document.querySelectorAll("#controls input, #controls select")) {
    if (node.id !== "config") node.addEventListener(node.tagName === "SELECT" ? "change" : "input", soon);
  }
  $("controls").addEventListener("submit", (event) => event.preventDefault());
  $("config").addEventListener("change", readConfig);
  $("config-clear").addEventListener("click", useCatalog);
  $("tab-plan").addEventListener("click", () => selectTab(false));
  $("tab-fit").addEventListener("click", () => selectTab(true));
  soon();
}

start();
