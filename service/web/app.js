// The playground: one job per selected variant with the same seed (POST /jobs) — and, for a model with
// LoRA adapters, the same adapter and scale — live progress from the job events, the images side by side
// with their figures and PSNR against fp, and the /models panel with a latency chart per variant.

import {
  ApiError,
  describeError,
  describeJobFailure,
  fieldErrors,
  fieldLabel,
  followJob,
  getApiKey,
  isAbort,
  NetworkError,
  requestJson,
  setApiKey,
  sleep,
} from "./api.js";
import {
  formatBytes,
  formatPsnr,
  formatSeconds,
  imagePixels,
  latencyChart,
  memoryKind,
  psnr,
} from "./figures.js";

const REFERENCE = "fp";
const MODELS_REFRESH_MS = 15000;
const BUILD_REFRESH_MS = 2000; // while a card waits for its variant's build
const MAX_SUBMIT_ATTEMPTS = 4;
const MAX_OBSERVED = 50;
const FORM_FIELDS = ["prompt", "negative_prompt", "model", "seed", "num_inference_steps", "guidance_scale",
  "width", "height", "adapter", "adapter_scale"];
const NO_ADAPTER = "";

const $ = (id) => document.getElementById(id);

const state = {
  models: [], // GET /models data
  modelsError: null,
  observed: new Map(), // "model/variant" -> [{inference_s, queue_wait_s, total_s}]
  run: null, // the current generation: {cards: Map, submit: AbortController, ...}
  modelsTimer: null,
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child != null) node.append(child);
  }
  return node;
}

function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

// ------------------------------------------------------------------ models

function currentModel() {
  const name = $("model").value;
  return state.models.find((m) => m.name === name) || state.models[0] || null;
}

function variantInfo(modelName, variantName) {
  const model = state.models.find((m) => m.name === modelName);
  return model?.variants.find((v) => v.name === variantName) || null;
}

function referenceVariant(model) {
  if (!model) return REFERENCE;
  const named = model.variants.find((v) => v.name === REFERENCE);
  const byRecipe = model.variants.find((v) => v.recipe === REFERENCE);
  return (named || byRecipe)?.name || REFERENCE;
}

async function loadModels() {
  try {
    const { data } = await requestJson("models");
    const first = state.models.length === 0;
    state.models = data?.data || [];
    state.modelsError = null;
    show($("page-error"), "");
    renderModelSelect(first);
    renderModelsTable();
    renderCharts();
    refreshCardFigures();
  } catch (err) {
    state.modelsError = err;
    show($("page-error"), `Could not load the model list. ${describeError(err)}`);
    if (err instanceof ApiError && err.status === 401) $("key-panel").open = true;
    if (!state.models.length) {
      const list = $("variant-list");
      list.replaceChildren(el("p", { class: "muted", text: "No models loaded yet (see the message above)." }));
      const body = $("models-table").tBodies[0];
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 12, class: "muted", text: "Not loaded." })));
    }
  }
}

function renderModelSelect(first) {
  const select = $("model");
  const previous = select.value;
  const names = state.models.map((m) => m.name);
  const same = names.length === select.options.length && names.every((n, i) => select.options[i].value === n);
  if (!same) {
    select.replaceChildren(...state.models.map((m) => el("option", { value: m.name, text: m.name })));
    if (names.includes(previous)) select.value = previous;
  }
  if (first || !same) applyModelDefaults();
  renderVariantChoices();
  renderAdapterChoices();
}

function applyModelDefaults() {
  const model = currentModel();
  if (!model) return;
  const { sizes, defaults } = model;
  $("num_inference_steps").value = defaults.num_inference_steps;
  $("guidance_scale").value = defaults.guidance_scale;
  for (const id of ["width", "height"]) {
    const input = $(id);
    input.min = sizes.min;
    input.max = sizes.max;
    input.step = sizes.multiple_of;
    input.value = sizes.default;
  }
  $("size-help").textContent = `Width and height: multiples of ${sizes.multiple_of} from ${sizes.min} to `
    + `${sizes.max} px (default ${sizes.default}).`;
  $("model-help").textContent = model.description || "";
  renderVariantChoices(true);
  renderAdapterChoices(true);
}

// ------------------------------------------------------------------ adapters (LoRA)

function modelAdapters(model) {
  return Array.isArray(model?.adapters) ? model.adapters : [];
}

function currentAdapter() {
  const name = $("adapter").value;
  if (name === NO_ADAPTER) return null;
  return modelAdapters(currentModel()).find((a) => a.name === name) || null;
}

/** The adapter picker follows the model: hidden when the model lists no adapters. */
function renderAdapterChoices(reset = false) {
  const adapters = modelAdapters(currentModel());
  const select = $("adapter");
  const previous = reset ? NO_ADAPTER : select.value;
  $("adapter-box").hidden = adapters.length === 0;
  const values = [NO_ADAPTER, ...adapters.map((a) => a.name)];
  const same = values.length === select.options.length && values.every((v, i) => select.options[i].value === v);
  if (!same) { // rebuilt only when the list changed, so a periodic refresh leaves an open list alone
    select.replaceChildren(el("option", { value: NO_ADAPTER, text: "None" }),
      ...adapters.map((a) => el("option", { value: a.name, text: a.name })));
  }
  const kept = adapters.some((a) => a.name === previous);
  select.value = kept ? previous : NO_ADAPTER;
  if (!kept) applyAdapterDefaults();
  else updateAdapterHelp();
}

function applyAdapterDefaults() {
  const adapter = currentAdapter();
  const scale = $("adapter_scale");
  scale.disabled = !adapter;
  scale.value = adapter ? adapter.scale : "";
  for (const id of ["adapter", "adapter_scale"]) {
    show($(`${id}-error`), "");
    $(id).removeAttribute("aria-invalid");
  }
  updateAdapterHelp();
}

function updateAdapterHelp() {
  const adapter = currentAdapter();
  $("adapter-help").textContent = adapter
    ? `${adapter.description || adapter.name} Default scale ${adapter.scale}; 0 turns it off.`
    : "Every selected variant runs with the adapter you pick here, so they can be compared with it.";
  updateTriggerHint();
}

function containsWord(text, word) {
  const escaped = word.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return new RegExp(`(^|[^\\p{L}\\p{N}])${escaped}($|[^\\p{L}\\p{N}])`, "iu").test(text);
}

// A trigger word is offered, never written into the prompt behind the user's back.
function updateTriggerHint() {
  const adapter = currentAdapter();
  const box = $("trigger-hint");
  const button = $("trigger-insert");
  if (!adapter?.trigger) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const present = containsWord($("prompt").value, adapter.trigger);
  box.dataset.present = String(present);
  $("trigger-text").textContent = present
    ? `The prompt contains the trigger “${adapter.trigger}”.`
    : `${adapter.name} shows only when the prompt contains its trigger “${adapter.trigger}”.`;
  button.hidden = present;
  button.textContent = `Insert “${adapter.trigger}” at the cursor`;
}

function insertTrigger() {
  const adapter = currentAdapter();
  if (!adapter?.trigger) return;
  const prompt = $("prompt");
  const text = prompt.value;
  const at = Number.isInteger(prompt.selectionStart) ? prompt.selectionStart : text.length;
  const before = text.slice(0, at);
  const after = text.slice(at);
  const lead = before && !/\s$/.test(before) ? " " : "";
  const tail = after && !/^\s/.test(after) ? " " : "";
  prompt.value = `${before}${lead}${adapter.trigger}${tail}${after}`;
  const start = before.length + lead.length;
  prompt.focus();
  prompt.setSelectionRange(start, start + adapter.trigger.length);
  show($("prompt-error"), "");
  prompt.removeAttribute("aria-invalid");
  updateTriggerHint();
}

function loraText(loras) {
  if (!loras?.length) return "none";
  return loras.map((l) => (l.scale == null ? l.name : `${l.name} × ${l.scale}`)).join(", ");
}

// A background build's progress, as GET /models and waiting jobs report it: phase, done/total, ETA.
function buildText(progress) {
  if (!progress) return "building…";
  const count = progress.total ? ` ${progress.done}/${progress.total}` : "";
  const eta = progress.eta_s != null ? `, about ${formatSeconds(progress.eta_s)} left` : "";
  return `building: ${progress.phase}${count}${eta}`;
}

function variantNote(variant) {
  const parts = [];
  if (variant.recipe !== variant.name) parts.push(variant.recipe);
  const words = {
    not_built: "not built yet: the first job builds it in the background",
    available: "built, not loaded",
    building: buildText(variant.progress),
    loaded: "loaded",
    failed: `failed${variant.reason ? `: ${variant.reason}` : ""}`,
  };
  parts.push(words[variant.state] || variant.state);
  return parts.join(" · ");
}

function renderVariantChoices(reset = false) {
  const model = currentModel();
  const list = $("variant-list");
  if (!model) return;
  const checked = new Map([...list.querySelectorAll("input[type=checkbox]")].map((c) => [c.value, c.checked]));
  list.replaceChildren(...model.variants.map((variant) => {
    const id = `variant-${model.name}-${variant.name}`.replace(/[^A-Za-z0-9_-]/g, "_");
    const box = el("input", {
      type: "checkbox", id, name: "variant", value: variant.name,
      checked: reset || !checked.has(variant.name) ? true : checked.get(variant.name),
    });
    return el("div", { class: "variant-choice" }, box,
      el("label", { htmlFor: id }, el("span", { class: "variant-name", text: variant.name }), " ",
        el("span", { class: "muted small", text: variantNote(variant) })));
  }));
}

function cell(text, attrs = {}) {
  return el("td", { text, ...attrs });
}

function fidelityText(fidelity) {
  if (!fidelity) return "–";
  if (fidelity.error) return fidelity.error;
  const parts = [];
  for (const key of ["psnr", "ssim", "lpips", "clip_score", "fid"]) {
    const value = fidelity[key];
    if (typeof value === "number") parts.push(`${key.toUpperCase()} ${value.toFixed(key === "psnr" ? 2 : 3)}`);
  }
  if (parts.length) {
    // where the figures come from: N prompts × seeds at S steps (recorded when the variant was built)
    const seeds = Array.isArray(fidelity.seeds) ? fidelity.seeds.length : null;
    const from = fidelity.eval_prompt_count != null
      ? ` (${fidelity.eval_prompt_count} prompts × ${seeds ?? "?"} seeds, ${fidelity.num_inference_steps ?? "?"} steps)`
      : "";
    return parts.join(", ") + from;
  }
  return Object.entries(fidelity).filter(([, v]) => typeof v !== "object").slice(0, 3)
    .map(([k, v]) => `${k} ${v}`).join(", ") || "–";
}

function renderModelsTable() {
  const body = $("models-table").tBodies[0];
  const rows = [];
  for (const model of state.models) {
    for (const v of model.variants) {
      const lat = v.latency || {};
      const memory = v.peak_memory_bytes != null
        ? `${formatBytes(v.peak_memory_bytes)}${v.memory_kind ? ` (${memoryKind(v.memory_kind)})` : ""}`
        : "–";
      const stateCell = el("td", {}, el("span", { class: `state state-${v.state}`, text: v.state.replace("_", " ") }));
      if (v.reason) stateCell.append(el("div", { class: "muted small", text: v.reason }));
      if (v.state === "building") stateCell.append(el("div", { class: "muted small build-progress", text: buildText(v.progress) }));
      rows.push(el("tr", { "data-variant": v.name },
        el("th", { scope: "row", text: model.name }),
        cell(v.name),
        cell(v.recipe),
        stateCell,
        cell([v.precision, v.device].filter(Boolean).join(" / ") || "–"),
        cell(formatBytes(v.weight_bytes), {
          title: [v.weight_bytes != null ? `${v.weight_bytes} bytes` : "",
            v.shared_bytes != null ? `+ ${formatBytes(v.shared_bytes)} shared with the model's other variants` : ""]
            .filter(Boolean).join(" "),
        }),
        cell(memory, { title: v.peak_memory_bytes != null ? `${v.peak_memory_bytes} bytes` : "" }),
        cell(formatSeconds(v.load_seconds)),
        cell(`${formatSeconds(lat.inference_p50_s)} / ${formatSeconds(lat.inference_p95_s)}`),
        cell(`${formatSeconds(lat.total_p50_s)} / ${formatSeconds(lat.total_p95_s)}`),
        cell(String(lat.samples ?? 0)),
        cell(fidelityText(v.fidelity))));
    }
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 12, class: "muted", text: "No models." })));
  body.replaceChildren(...rows);
}

function renderCharts() {
  const model = currentModel();
  const box = $("charts");
  if (!model) {
    box.replaceChildren();
    return;
  }
  box.replaceChildren(...model.variants.map((v) => {
    const samples = state.observed.get(`${model.name}/${v.name}`) || [];
    return el("figure", { class: "chart-box", "data-variant": v.name },
      el("figcaption", { text: `${v.name}` }), latencyChart(v.name, samples, v.latency));
  }));
}

// ------------------------------------------------------------------ the form

function clearErrors() {
  show($("form-error"), "");
  for (const id of [...FORM_FIELDS, "variant"]) {
    const box = $(`${id}-error`);
    if (box) show(box, "");
    $(id)?.removeAttribute("aria-invalid");
  }
}

// The API names adapter problems by their place in the request (loras.0.scale); the form has one picker.
function formField(field) {
  if (/^loras\.\d+\.scale$/.test(field)) return "adapter_scale";
  if (field === "loras" || field.startsWith("loras.")) return "adapter";
  return field;
}

function setFieldError(apiField, message) {
  const field = formField(apiField);
  const box = $(`${field}-error`);
  if (!box) return false;
  show(box, message);
  $(field)?.setAttribute("aria-invalid", "true");
  return true;
}

function focusFirstInvalid() {
  const first = document.querySelector("#gen-form [aria-invalid=true]");
  (first || $("prompt")).focus();
}

function randomSeed() {
  const word = new Uint32Array(1);
  crypto.getRandomValues(word);
  return String(word[0] >>> 1); // 0 .. 2^31 - 1
}

/** The request fields (everything but the variant) as a JSON fragment, or null after showing field errors. */
function readForm(model) {
  const problems = [];
  const prompt = $("prompt").value;
  if (!prompt.trim()) problems.push(["prompt", "Enter a prompt: describe what to draw."]);
  const checked = [...document.querySelectorAll("#variant-list input[type=checkbox]:checked")].map((c) => c.value);
  if (!model) problems.push(["variant", "No model is loaded, so there is nothing to generate with."]);
  else if (!checked.length) problems.push(["variant", "Select at least one variant."]);
  let seed = $("seed").value.trim();
  if (!seed) {
    seed = randomSeed();
    $("seed").value = seed;
  }
  if (!/^\d+$/.test(seed)) problems.push(["seed", "Use a whole number (0 or more), or press Random."]);
  const adapter = model ? currentAdapter() : null;
  const scaleInput = $("adapter_scale");
  if (adapter && (scaleInput.validity.badInput || (scaleInput.value.trim() !== ""
    && !Number.isFinite(Number(scaleInput.value))))) {
    problems.push(["adapter_scale", "Adapter scale must be a number."]);
  }
  const numbers = {};
  for (const id of ["num_inference_steps", "guidance_scale", "width", "height"]) {
    const input = $(id);
    if (input.validity.badInput) {
      problems.push([id, `${fieldLabel(id)} must be a number.`]);
    } else if (input.value.trim() !== "") {
      numbers[id] = Number(input.value);
    }
  }
  if (problems.length) {
    for (const [field, message] of problems) setFieldError(field, message);
    show($("form-error"), `Please fix: ${problems.map(([, m]) => m).join(" ")}`);
    focusFirstInvalid();
    return null;
  }
  const fields = { prompt, model: model.name, ...numbers };
  const negative = $("negative_prompt").value;
  if (negative.trim()) fields.negative_prompt = negative;
  if (adapter) {
    const scale = scaleInput.value.trim() === "" ? null : Number(scaleInput.value); // null: the default
    fields.loras = [{ name: adapter.name, scale }];
  }
  return { fields, seed, variants: model.variants.map((v) => v.name).filter((v) => checked.includes(v)) };
}

function jobBody(fields, variant, seed) {
  // The seed goes in as written: it may exceed 2^53, which a JS number would round.
  const json = JSON.stringify({ ...fields, variant });
  return `${json.slice(0, -1)},"seed":${seed}}`;
}

// ------------------------------------------------------------------ result cards

class Card {
  constructor(run, model, variant) {
    this.run = run;
    this.model = model;
    this.variant = variant;
    this.job = null;
    this.final = null;
    this.pixels = null;
    const slug = variant.replace(/[^A-Za-z0-9_-]/g, "_");
    this.img = el("img", { alt: "", hidden: true, decoding: "sync" });
    this.placeholder = el("div", { class: "placeholder", "aria-hidden": "true" });
    this.frame = el("div", { class: "frame", style: `aspect-ratio: ${run.width || 1} / ${run.height || 1}` },
      this.img, this.placeholder);
    this.progress = el("progress", { max: 1, value: 0, "aria-label": `${variant} progress` });
    this.status = el("p", { class: "card-status", text: "Waiting to be submitted…" });
    this.figures = {};
    const dl = el("dl", { class: "figures" });
    const rows = [["variant", "Variant"], ["recipe", "Recipe"], ["latency", "Latency"], ["weights", "Weights"],
      ["memory", "Peak memory"], ["psnr", `PSNR vs ${run.reference}${run.loras.length ? " (same adapter)" : ""}`]];
    if (run.loras.length) rows.splice(1, 0, ["adapter", "Adapter"]);
    for (const [key, label] of rows) {
      this.figures[key] = el("dd", { class: `fig-${key}`, text: "–" });
      dl.append(el("div", { class: "figure-row" }, el("dt", { text: label }), this.figures[key]));
    }
    this.figures.variant.textContent = variant;
    if (this.figures.adapter) this.figures.adapter.textContent = loraText(run.loras);
    this.node = el("article", {
      class: "card", "data-variant": variant, "data-state": "pending", "aria-labelledby": `card-${slug}-title`,
    },
    el("h3", { id: `card-${slug}-title`, text: variant }),
    this.frame,
    this.progress, this.status, dl);
    this.refreshFigures();
  }

  setState(value) {
    this.node.dataset.state = value;
  }

  say(text) {
    this.status.textContent = text;
  }

  refreshFigures() {
    const info = variantInfo(this.model, this.variant);
    if (!info) return;
    this.figures.recipe.textContent = info.recipe;
    this.figures.weights.textContent = formatBytes(info.weight_bytes);
    this.figures.weights.title = info.weight_bytes != null ? `${info.weight_bytes} bytes` : "";
    const kind = info.memory_kind ? ` (${memoryKind(info.memory_kind)})` : "";
    this.figures.memory.textContent = info.peak_memory_bytes != null ? `${formatBytes(info.peak_memory_bytes)}${kind}` : "–";
    this.figures.memory.title = info.peak_memory_bytes != null ? `${info.peak_memory_bytes} bytes` : "";
    const waiting = this.buildWait();
    if (waiting) this.say(waiting);
  }

  // While its variant is being built the job stays queued; the build's progress says how long.
  buildWait() {
    const info = variantInfo(this.model, this.variant);
    if (!info || info.state !== "building" || !["queued", "pending"].includes(this.node.dataset.state)) return null;
    return `Waiting for the variant to be built (${buildText(info.progress)})…`;
  }

  onEvent(type, data) {
    switch (type) {
      case "queued":
        this.setState("queued");
        this.say(queuedText(data));
        break;
      case "started":
        this.setState("running");
        this.say(`Running${data?.worker_id ? ` on worker ${data.worker_id}` : ""}`
          + `${data?.attempt > 1 ? ` (attempt ${data.attempt})` : ""}…`);
        break;
      case "progress":
        this.setState("running");
        this.showProgress(data);
        break;
      case "requeued":
        this.setState("queued");
        this.say(this.buildWait() || "Handed back to the queue; waiting for a worker…");
        break;
      case "cancel_requested":
        this.say("Cancel requested: stopping after the current step…");
        break;
      case "reconnecting":
        this.say(`Live updates dropped; reconnecting (attempt ${data.attempt})…`);
        break;
      case "polling":
        this.node.dataset.transport = "polling";
        this.say("Live updates unavailable; checking the job every half second…");
        break;
      case "connection_lost":
        this.say("Cannot reach the server; still trying…");
        break;
      case "snapshot":
        if (data.state === "queued") this.say(queuedText(data));
        else if (data.state === "running" && data.progress) this.showProgress(data.progress);
        else if (data.state === "running") this.say("Running…");
        this.setState(data.state);
        break;
      default:
        break;
    }
  }

  showProgress(p) {
    if (!p?.total) return;
    this.progress.max = p.total;
    this.progress.value = p.step;
    this.node.dataset.progress = `${p.step}/${p.total}`;
    this.say(`Step ${p.step} of ${p.total}`);
  }

  async succeed(job) {
    this.final = job;
    const image = job.result?.images?.[0];
    if (!image) {
      this.fail("The job finished but returned no image.");
      return;
    }
    const t = job.result.timings;
    if (this.figures.adapter && Array.isArray(job.params?.loras)) {
      this.figures.adapter.textContent = loraText(job.params.loras); // the scale the server applied
    }
    this.figures.latency.textContent = `queue ${formatSeconds(t.queue_wait_s)} · inference `
      + `${formatSeconds(t.inference_s)} (total ${formatSeconds(t.total_s)})`;
    this.progress.max = 1;
    this.progress.value = 1;
    const mime = { png: "image/png", jpeg: "image/jpeg", webp: "image/webp" }[image.format] || "image/png";
    const withAdapter = this.run.loras.length ? ` with ${loraText(this.run.loras)}` : "";
    this.img.alt = `${this.variant}${withAdapter}: “${this.run.prompt}”, seed ${this.run.seed}`;
    this.img.src = `data:${mime};base64,${image.b64_json}`;
    try {
      await this.img.decode();
    } catch {
      this.fail("The image came back but the browser could not display it.");
      return;
    }
    this.img.hidden = false;
    this.placeholder.hidden = true;
    this.pixels = imagePixels(this.img);
    this.say(`Done: ${image.width}×${image.height}, seed ${this.run.seed}.`);
    this.setState("succeeded");
  }

  fail(message) {
    this.setState("failed");
    this.progress.hidden = true;
    this.frame.hidden = true;
    this.status.classList.add("error-text");
    this.say(message);
    this.figures.psnr.textContent = "–";
  }

  setPsnr(text, value) {
    this.figures.psnr.textContent = text;
    if (value === undefined) delete this.figures.psnr.dataset.psnr;
    else this.figures.psnr.dataset.psnr = value === Infinity ? "inf" : String(value);
  }
}

function queuedText(data) {
  if (data?.waiting_for_build) return `Waiting for the variant to be built (${buildText(data.waiting_for_build)})…`;
  if (data?.queue_position == null) return "Queued…";
  const eta = data.eta_s != null ? `, starts in about ${formatSeconds(data.eta_s)}` : "";
  return `Queued (position ${data.queue_position}${eta})…`;
}

function updatePsnr(run) {
  const ref = run.cards.get(run.reference);
  for (const card of run.cards.values()) {
    if (card.node.dataset.state !== "succeeded") continue;
    if (card === ref) {
      card.setPsnr("reference image", undefined);
    } else if (!ref) {
      card.setPsnr(`PSNR needs ${run.reference}: select the ${run.reference} variant to compare against it.`);
    } else if (ref.node.dataset.state === "failed") {
      card.setPsnr(`PSNR needs the ${run.reference} image, which did not come back.`);
    } else if (!ref.pixels) {
      card.setPsnr(`waiting for ${run.reference}…`);
    } else {
      const value = psnr(ref.pixels, card.pixels);
      if (value == null) card.setPsnr("sizes differ");
      else card.setPsnr(formatPsnr(value), value);
    }
  }
}

function refreshCardFigures() {
  if (!state.run) return;
  for (const card of state.run.cards.values()) card.refreshFigures();
}

function recordLatency(card, job) {
  const key = `${card.model}/${card.variant}`;
  const list = state.observed.get(key) || [];
  const t = job.result.timings;
  list.push({ inference_s: t.inference_s, queue_wait_s: t.queue_wait_s, total_s: t.total_s });
  state.observed.set(key, list.slice(-MAX_OBSERVED));
}

// ------------------------------------------------------------------ a run

async function submitJob(card, body, signal) {
  const idempotencyKey = `playground-${card.run.id}-${card.variant}`; // makes a resubmission safe
  for (let attempt = 1; ; attempt += 1) {
    try {
      const { data } = await requestJson("jobs", {
        method: "POST", body, signal, headers: { "Idempotency-Key": idempotencyKey },
      });
      return data;
    } catch (err) {
      if (isAbort(err) || attempt >= MAX_SUBMIT_ATTEMPTS) throw err;
      const busy = err instanceof ApiError && err.status === 503;
      if (!busy && !(err instanceof NetworkError)) throw err;
      const wait = Math.min(busy && err.retryAfter != null ? err.retryAfter : 2 ** attempt, 60);
      for (let left = wait; left > 0; left -= 1) {
        card.say(`${describeError(err).replace(/ Try again in \d+ s\.$/, "")} Retrying in ${left} s…`);
        await sleep(1000, signal);
      }
      card.say("Submitting again…");
    }
  }
}

function isRequestProblem(err) {
  // The same body goes to every variant: these errors would repeat for each, so stop and show them once.
  if (!(err instanceof ApiError)) return false;
  return [401, 403, 413, 422].includes(err.status) || (err.status === 404 && ["model", "adapter"].includes(err.param));
}

function showRequestProblem(err) {
  for (const problem of fieldErrors(err)) setFieldError(problem.field, problem.message);
  if (err.status === 404 && err.param === "adapter") setFieldError("adapter", describeError(err));
  show($("form-error"), describeError(err));
  if (err.status === 401) {
    $("key-panel").open = true;
    $("api-key").focus();
  } else if (err.status === 422) {
    focusFirstInvalid();
  }
}

async function follow(card, signal) {
  try {
    const job = await followJob(card.job.id, { onEvent: (type, data) => card.onEvent(type, data), signal });
    if (job.state === "succeeded") {
      await card.succeed(job);
      if (card.node.dataset.state === "succeeded") recordLatency(card, job);
    } else {
      card.fail(describeJobFailure(job));
    }
  } catch (err) {
    card.fail(describeError(err));
  }
  updatePsnr(card.run);
  updateRunStatus(card.run);
}

function updateRunStatus(run) {
  const cards = [...run.cards.values()];
  const done = cards.filter((c) => ["succeeded", "failed"].includes(c.node.dataset.state)).length;
  if (done < cards.length) {
    $("run-status").textContent = `Generating: ${done} of ${cards.length} finished…`;
    return;
  }
  const ok = cards.filter((c) => c.node.dataset.state === "succeeded").length;
  const seconds = ((performance.now() - run.started) / 1000).toFixed(1);
  const withAdapter = run.loras.length ? `, adapter ${loraText(run.loras)}` : "";
  $("run-status").textContent = `Finished in ${seconds} s: ${ok} of ${cards.length} image${cards.length === 1 ? "" : "s"}`
    + `${withAdapter}.`;
}

async function generate(event) {
  event.preventDefault();
  if (state.run?.active) return;
  clearErrors();
  const model = currentModel();
  const form = readForm(model);
  if (!form) return;
  const { fields, seed, variants } = form;
  const run = {
    id: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`,
    active: true,
    cards: new Map(),
    submit: new AbortController(),
    follow: new AbortController(),
    reference: referenceVariant(model),
    loras: fields.loras || [],
    prompt: fields.prompt,
    seed,
    width: fields.width || model.sizes.default,
    height: fields.height || model.sizes.default,
    started: performance.now(),
  };
  state.run = run;
  $("results").dataset.run = "active";
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("results-empty").hidden = true;
  const row = $("result-row");
  row.replaceChildren();
  for (const variant of variants) {
    const card = new Card(run, model.name, variant);
    run.cards.set(variant, card);
    row.append(card.node);
  }
  $("run-status").textContent = `Submitting ${variants.length} job${variants.length === 1 ? "" : "s"}…`;
  const following = [];
  try {
    for (const variant of variants) {
      const card = run.cards.get(variant);
      card.say("Submitting…");
      try {
        card.job = await submitJob(card, jobBody(fields, variant, seed), run.submit.signal);
      } catch (err) {
        if (isRequestProblem(err)) {
          showRequestProblem(err);
          for (const c of [...run.cards.values()]) {
            if (!c.job) {
              c.node.remove();
              run.cards.delete(c.variant);
            }
          }
          break;
        }
        const gaveUp = err instanceof ApiError && err.status === 503 ? ` Gave up after ${MAX_SUBMIT_ATTEMPTS} tries;`
          + " press Generate to try again." : "";
        const words = gaveUp ? describeError(err).replace(/ Try again in \d+ s\.$/, "") : describeError(err);
        card.fail(isAbort(err) ? "Canceled before it was submitted." : `${words}${gaveUp}`);
        if (isAbort(err)) break;
        continue;
      }
      card.setState("queued");
      card.say(queuedText(card.job));
      following.push(follow(card, run.follow.signal));
    }
    for (const card of run.cards.values()) {
      if (!card.job && card.node.dataset.state !== "failed") card.fail("Canceled before it was submitted.");
    }
    if (!run.cards.size) {
      $("results-empty").hidden = false;
      $("run-status").textContent = "Nothing was generated.";
    }
    await Promise.allSettled(following);
    if (following.length) await loadModels(); // fresh weights, peak memory and percentiles
    if (run.cards.size) updateRunStatus(run);
  } finally {
    run.active = false;
    $("generate").disabled = false;
    $("cancel").disabled = true;
    $("results").dataset.run = "done";
  }
}

async function cancelRun() {
  const run = state.run;
  if (!run?.active) return;
  $("cancel").disabled = true;
  run.submit.abort();
  const pending = [...run.cards.values()].filter((c) => c.job && !["succeeded", "failed"].includes(c.node.dataset.state));
  await Promise.all(pending.map(async (card) => {
    try {
      await requestJson(`jobs/${encodeURIComponent(card.job.id)}`, { method: "DELETE" });
    } catch (err) {
      if (err instanceof ApiError && err.status === 409) return; // it had already finished
      card.say(`Could not cancel: ${describeError(err)}`);
    }
  }));
}

// ------------------------------------------------------------------ start-up

function setupApiKey() {
  const input = $("api-key");
  input.value = getApiKey();
  if (!input.value) $("key-panel").open = false;
  input.addEventListener("input", () => setApiKey(input.value.trim()));
  input.addEventListener("change", () => loadModels());
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault(); // Enter in the key field: keep it and reload the model list
    setApiKey(input.value.trim());
    loadModels();
  });
  $("api-key-clear").addEventListener("click", () => {
    input.value = "";
    setApiKey("");
    loadModels();
    input.focus();
  });
}

function waitingForBuild() {
  if (!state.run?.active) return false;
  return [...state.run.cards.values()].some((c) => ["queued", "pending"].includes(c.node.dataset.state)
    && ["building", "not_built"].includes(variantInfo(c.model, c.variant)?.state));
}

function scheduleModelRefresh() {
  clearInterval(state.buildTimer);
  state.buildTimer = setInterval(() => {
    if (document.visibilityState === "visible" && waitingForBuild()) loadModels();
  }, BUILD_REFRESH_MS);
  clearInterval(state.modelsTimer);
  state.modelsTimer = setInterval(() => {
    const needsKey = state.modelsError instanceof ApiError && state.modelsError.status === 401;
    if (document.visibilityState === "visible" && !needsKey) loadModels();
  }, MODELS_REFRESH_MS);
}

function init() {
  setupApiKey();
  $("gen-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancelRun);
  $("seed-random").addEventListener("click", () => {
    $("seed").value = randomSeed();
    show($("seed-error"), "");
    $("seed").removeAttribute("aria-invalid");
  });
  $("model").addEventListener("change", () => {
    applyModelDefaults();
    renderCharts();
  });
  $("adapter").addEventListener("change", applyAdapterDefaults);
  $("trigger-insert").addEventListener("click", insertTrigger);
  $("prompt").addEventListener("input", updateTriggerHint);
  $("models-refresh").addEventListener("click", () => loadModels());
  // Ctrl/Cmd+Enter in a text area generates.
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("gen-form").requestSubmit();
    });
  }
  $("seed").value = randomSeed();
  loadModels();
  scheduleModelRefresh();
}

init();
