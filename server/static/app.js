// Playground: modes, requests and wiring; views in render.js, colours in colour.js.
import { PlainError, getJSON, postJSON, streamGenerate } from "./api.js";
import { legend, renderGrid, renderTokens, streamToken, viewOptions } from "./render.js";
import { generationTrace, perplexityTrace } from "./trace.js";
import { bits } from "./colour.js";

const $ = (id) => document.getElementById(id);
// Each mode keeps its own results (its own section of the page), colour-by choice, status and error, so
// switching modes never shows one mode's numbers, legend or status in another.
const fresh = (view) => ({ view, traces: [], status: "", error: "" });
const state = { mode: "generate", models: [], controller: null,
  modes: { generate: fresh("all"), perplexity: fresh("all"), compare: fresh("surprisal") } };
const LABELS = { generate: ["Prompt", "Generate"], perplexity: ["Text to score", "Score"], compare: ["Prompt", "Compare"] };
const part = (mode, name) => document.querySelector(`#result-${mode} .${name}`);
const ONE_MODEL = "Compare needs two models, and this server serves one: start it with two --checkpoint options " +
  "(CHIAR and its baseline) to compare them.";

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

// The `model` field only where the server serves several (a one-model server refuses unknown fields).
const modelField = (id) => (state.models.length > 1 && id ? { model: id } : {});

async function loadModels() {
  try {
    state.models = (await getJSON("/v1/models")).data;
    const m = state.models;
    $("model").textContent = m.map((c) => `${c.id} (${c.arch}, context ${c.max_model_len})`).join(" · ");
    for (const [select, arch] of [[$("model_a"), "chiar"], [$("model_b"), "baseline"]]) {
      select.replaceChildren(...m.map((c) => new Option(`${c.id} (${c.arch})`, c.id)));
      const pick = m.find((c) => c.arch === arch) ?? m[select === $("model_a") ? 0 : m.length - 1];
      if (pick) select.value = pick.id;
    }
    setMode(state.mode);
  } catch (e) {
    $("model").textContent = e.message;
  }
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("[role=tab]")) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  $("prompt-label").textContent = LABELS[mode][0];
  $("run").textContent = LABELS[mode][1];
  $("gen-params").hidden = mode === "perplexity";
  $("compare-models").hidden = mode !== "compare" && state.models.length < 2;
  $("model_b").parentElement.hidden = mode !== "compare";
  $("model_a").parentElement.firstChild.textContent = mode === "compare" ? "left " : "model ";
  for (const m of Object.keys(LABELS)) $(`result-${m}`).hidden = m !== mode;
  const single = state.models.length === 1;
  $("compare-note").textContent = single ? ONE_MODEL : "Runs the same prompt and seed on two models side by side.";
  if (mode === "compare" && single) $("compare-models").hidden = true;
  showStatus();
  refreshViews();
}

// The status line and the error box show the visible mode's own.
function showStatus() {
  const m = state.modes[state.mode];
  $("status").textContent = m.status;
  $("error").textContent = m.error;
  $("error").hidden = !m.error;
  $("run").disabled = state.controller !== null || (state.mode === "compare" && state.models.length === 1);
}

function setStatus(mode, status, error = "") {
  Object.assign(state.modes[mode], { status, error });
  if (mode === state.mode) showStatus();
}

// ------------------------------------------------------------------ views
const asView = (v) => (v === "all" || v === "surprisal" ? v : Number(v));

// Draw a mode's results in its own section with its own colour-by (visible or not).
function renderMode(mode) {
  const m = state.modes[mode], view = asView(m.view);
  if (mode === "compare") {
    m.traces.forEach((trace, k) => {
      const pane = $(k === 0 ? "pane-a" : "pane-b");
      renderTokens(pane.querySelector(".tokens"), pane.querySelector(".details"), trace, view);
    });
  } else if (m.traces[0]) {
    renderTokens(part(mode, "tokens"), part(mode, "details"), m.traces[0], view);
    renderGrid(part(mode, "grid"), part(mode, "grid-caption"), m.traces[0]);
  }
}

// The colour-by options and legend of the visible mode, then its results.
function refreshViews() {
  const m = state.modes[state.mode];
  const richest = [...m.traces].sort((a, b) => b.routingLayers.length - a.routingLayers.length)[0];
  const select = $("colour_by");
  select.replaceChildren(...viewOptions(richest).map(([v, label]) => new Option(label, v)));
  select.value = [...select.options].some((o) => o.value === m.view) ? m.view : "all";
  m.view = select.value;
  legend($("legend"), m.view, richest);
  renderMode(state.mode);
}

const shown = (mode) => (state.mode === mode ? refreshViews() : renderMode(mode));

const ms = (s) => (s === null || s === undefined ? "n/a" : `${(s * 1000).toFixed(0)} ms`);

function stat(name, label, value, text) {
  const s = document.createElement("span");
  s.dataset.stat = name;
  s.className = "stat";
  s.dataset.value = String(value);
  s.textContent = `${label} ${text ?? value}`;
  return s;
}

function meanBits(trace, generatedOnly) {
  const lps = trace.tokens.filter((t) => t.logprob !== null && (!generatedOnly || !t.prompt)).map((t) => bits(t.logprob));
  return lps.length ? lps.reduce((a, b) => a + b, 0) / lps.length : null;
}

function generationStats(done, trace) {
  const f = done.flops;
  return [
    stat("stat-tokens", "tokens", done.usage.completion_tokens, `${done.usage.completion_tokens} (finish: ${done.finish_reason})`),
    stat("stat-ttft", "first token", done.timing.time_to_first_token_seconds, ms(done.timing.time_to_first_token_seconds)),
    stat("stat-latency", "latency", done.timing.total_seconds, ms(done.timing.total_seconds)),
    stat("stat-flops", "FLOPs", f.ratio, `${(f.ratio * 100).toFixed(1)}% of dense`),
    stat("stat-surprisal", "mean surprisal of the generated tokens", meanBits(trace, true), `${meanBits(trace, true)?.toFixed(2) ?? "n/a"} bits`),
  ];
}

// ------------------------------------------------------------------ runs
async function generateInto(tokensBox, body, signal) {
  const pieces = [];
  const prompt = document.createElement("span");
  prompt.className = "tok prompt pending";
  prompt.textContent = body.prompt;
  tokensBox.replaceChildren(prompt);
  const done = await streamGenerate(body, signal, (event) => {
    event.token_ids.forEach((_, k) => pieces.push(k === 0 ? event.text : ""));
    streamToken(tokensBox, event.text);
  });
  return [done, generationTrace(done, pieces)];
}

function generateBody(seed) {
  return {
    prompt: $("prompt").value,
    max_new_tokens: numberOrNull("max_new_tokens") ?? 48,
    temperature: numberOrNull("temperature") ?? 1.0,
    top_p: numberOrNull("top_p"),
    seed,
    return_routing: true,
    return_logprobs: true,
  };
}

async function runGenerate(signal) {
  const body = { ...generateBody(numberOrNull("seed")), ...modelField($("model_a").value) };
  const [done, trace] = await generateInto(part("generate", "tokens"), body, signal);
  state.modes.generate.traces = [trace];
  shown("generate");
  part("generate", "stats").replaceChildren(...generationStats(done, trace));
}

async function runPerplexity(signal) {
  const body = { text: $("prompt").value, return_logprobs: true, return_routing: true, ...modelField($("model_a").value) };
  const res = await postJSON("/v1/perplexity", body, signal);
  const r = res.results[0];
  const trace = perplexityTrace(res, r);
  state.modes.perplexity.traces = [trace];
  shown("perplexity");
  const num = (x, d) => (x === null ? "n/a" : x.toFixed(d));
  part("perplexity", "stats").replaceChildren(
    stat("ppl-token", "token PPL", r.perplexity, num(r.perplexity, 3)),
    stat("ppl-word", "word PPL", r.word_perplexity, num(r.word_perplexity, 3)),
    stat("ppl-bpb", "bits per byte", r.bits_per_byte, num(r.bits_per_byte, 4)),
    stat("ppl-tokens", "tokens", r.tokens), stat("ppl-windows", "windows", r.windows),
    stat("ppl-latency", "latency", res.timing.total_seconds, ms(res.timing.total_seconds)),
    stat("ppl-flops", "FLOPs", r.flops.ratio, `${(r.flops.ratio * 100).toFixed(1)}% of dense`));
}

function pane(id, modelId) {
  const card = state.models.find((c) => c.id === modelId);
  const box = $(id);
  const h = document.createElement("h3");
  h.textContent = card ? `${card.id} (${card.arch})` : modelId;
  const tokens = document.createElement("div");
  tokens.className = "tokens";
  tokens.setAttribute("role", "group");
  tokens.setAttribute("aria-label", `Tokens of ${modelId}`);
  const details = document.createElement("div");
  details.className = "details";
  details.setAttribute("aria-live", "polite");
  const stats = document.createElement("p");
  stats.className = "stats";
  box.replaceChildren(h, tokens, details, stats);
  box.dataset.model = modelId;
  box.hidden = false;
  return { tokens, stats };
}

async function runCompare(signal) {
  if (state.models.length < 2) throw new PlainError(ONE_MODEL);
  // one seed for both sides, so they draw from the same random stream
  const seed = numberOrNull("seed") ?? Math.floor(Math.random() * 2 ** 31);
  $("seed").placeholder = `random (last: ${seed})`;
  const m = state.modes.compare;
  m.traces = [];
  const ids = [$("model_a").value, $("model_b").value];
  const panes = [pane("pane-a", ids[0]), pane("pane-b", ids[1])];
  for (let k = 0; k < 2; k++) {  // one after the other: each latency is measured alone
    const [done, trace] = await generateInto(panes[k].tokens, { ...generateBody(seed), model: ids[k] }, signal);
    m.traces.push(trace);
    panes[k].stats.replaceChildren(...generationStats(done, trace));
    shown("compare");
  }
}

// A run belongs to the mode it started in: its results, status and error stay there if the user switches.
async function run() {
  const mode = state.mode;
  clearResults(mode);
  state.controller = new AbortController();
  setStatus(mode, "running…");
  $("stop").disabled = false;
  try {
    await { generate: runGenerate, perplexity: runPerplexity, compare: runCompare }[mode](state.controller.signal);
    state.controller = null;
    setStatus(mode, "done");
  } catch (e) {
    state.controller = null;
    if (e.name === "AbortError") {
      setStatus(mode, "stopped");  // what streamed in before Stop stays
    } else {
      clearResults(mode);  // nothing of a failed request (its pending prompt) stays beside the error
      setStatus(mode, "failed", e instanceof PlainError ? e.message : `Something went wrong in the page: ${e.message}`);
    }
  } finally {
    state.controller = null;
    $("stop").disabled = true;
    showStatus();
  }
}

// A new run replaces the mode's results, so "failed" never sits next to an earlier run's text.
function clearResults(mode) {
  state.modes[mode].traces = [];
  if (mode === "compare") {
    for (const id of ["pane-a", "pane-b"]) Object.assign($(id), { hidden: true }).replaceChildren();
  } else {
    for (const name of ["tokens", "stats", "grid", "grid-caption"]) part(mode, name).replaceChildren();
    part(mode, "details").textContent = "";
  }
  shown(mode);
}

for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
$("run").addEventListener("click", run);
$("stop").addEventListener("click", () => state.controller?.abort());
$("colour_by").addEventListener("change", () => {
  state.modes[state.mode].view = $("colour_by").value;
  refreshViews();
});
$("api_key").addEventListener("change", loadModels);
setMode("generate");
loadModels();
