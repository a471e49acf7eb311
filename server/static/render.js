// The views: tokens on the text (chiaroscuro), the details of one token, the tokens x layers grid.
import { NEUTRAL, TONES, bits, entropyRange, layerPaint, normalised, tokenPaint, SURPRISAL_MAX_BITS } from "./colour.js";
import { attentionShares } from "./trace.js";

const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const fmt = (x, d = 3) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(d));
const show = (text) => JSON.stringify(text);

// A token span while it streams in, before routing is known.
export function streamToken(container, text) {
  const span = el("span", "tok gen streaming", text);
  container.append(span);
  return span;
}

// Options of the "colour by" selector for a trace.
export function viewOptions(trace) {
  const options = [["all", "all routing layers (share to attention)"]];
  if (trace?.metarouter) options.push(["0", "layer 1: MetaRouter gate"]);
  for (const l of trace?.routingLayers ?? []) options.push([String(l), `layer ${l + 1}: operator, entropy`]);
  options.push(["surprisal", "surprisal (bits)"]);
  return options;
}

export function legend(container, view, trace) {
  const ranges = trace ? entropyRange(trace.tokens, trace.layers) : null;
  const span = (r, d = 3) => (r && r[1] >= r[0] ? `${fmt(r[0], d)} – ${fmt(r[1], d)}` : "n/a");
  const swatch = (p, label) => {
    const s = el("span", "swatch");
    const i = el("i");
    i.style.background = p.bg;
    s.append(i, label);
    return s;
  };
  container.replaceChildren();
  if (view === "surprisal") {
    container.append(swatch(TONES.surprisal(0), "0 bits (expected)"), swatch(TONES.surprisal(SURPRISAL_MAX_BITS / 2), `${SURPRISAL_MAX_BITS / 2} bits`),
      swatch(TONES.surprisal(SURPRISAL_MAX_BITS), `≥ ${SURPRISAL_MAX_BITS} bits (surprising)`), swatch(NEUTRAL, "not predicted"),
      el("span", "note", "Surprisal = −log₂ p of the token under the model's raw distribution; fixed scale."));
  } else if (view === "all") {
    container.append(swatch(TONES.share(1), "every routing layer: attention"), swatch(TONES.share(0.5), "half"),
      swatch(TONES.share(0), "every routing layer: DCT mixing"), swatch(NEUTRAL, "not processed"),
      el("span", "note", "Brightness = share of routing layers (2…L−1) that sent the token to attention."));
  } else if (view === "0") {
    container.append(swatch(TONES.gate(1), "highest gate"), swatch(TONES.gate(0.5), "middle"), swatch(TONES.gate(0), "lowest gate"),
      el("span", "note", `Layer 1: brightness = the token's MetaRouter gate, min-max normalised over this request (gate ${span(ranges?.gate)}).`));
  } else {
    const layer = Number(view);
    const cut = trace?.thresholds[layer] ?? [];
    container.append(swatch(TONES.attention(1), "attention (high entropy)"), swatch(TONES.attention(0), "attention (low)"));
    if (cut.length > 1) container.append(swatch(TONES.rbf(0.5), "RBF"));
    container.append(swatch(TONES.dct(1), "DCT (high entropy)"), swatch(TONES.dct(0), "DCT (low)"),
      el("span", "note", `Layer ${layer + 1}: light = attention, dark = DCT mixing; brightness within each = the layer's spectral ` +
        `entropy, min-max normalised over this request's tokens (entropy ${span(ranges?.[layer])}; ` +
        `router threshold${cut.length > 1 ? "s" : ""} ${cut.map((c) => fmt(c)).join(" / ") || "n/a"}).`));
  }
}

function describe(trace, tok, index, ranges) {
  const box = el("div");
  const where = tok.prompt ? (trace.promptCount === trace.tokens.length ? "text" : "prompt") : "generated";
  const head = el("p", "", `Token ${index + 1} ${show(tok.text)}${tok.eos ? " (EOS)" : ""}, ${where}; surprisal ` +
    (tok.logprob === null ? "n/a" : `${fmt(bits(tok.logprob), 2)} bits (p = ${fmt(Math.exp(tok.logprob), 4)})`));
  box.append(head);
  if (!tok.ops) {
    box.append(el("p", "", "Not processed by the model (the last token is only predicted), so no routing."));
    return box;
  }
  const table = el("table");
  const hr = el("tr");
  for (const h of ["layer", "operator", "entropy", "normalised", "threshold", "gate"]) hr.append(el("th", "", h));
  table.append(hr);
  for (let l = 0; l < trace.layers; l++) {
    const tr = el("tr");
    const cut = trace.thresholds[l] ?? [];
    tr.append(el("td", "", String(l + 1)), el("td", "", trace.names[tok.ops[l]]), el("td", "", fmt(tok.ent?.[l])),
      el("td", "", tok.ent?.[l] === null ? "n/a" : fmt(normalised(tok.ent[l], ranges[l]), 2)),
      el("td", "", cut.length ? cut.map((c) => fmt(c)).join(" / ") : "—"),
      el("td", "", l === 0 && trace.metarouter ? fmt(tok.gate) : "—"));
    table.append(tr);
  }
  box.append(table);
  return box;
}

// Tokens on the text; hovering, tapping or focusing one writes its details into `details`.
export function renderTokens(container, details, trace, view) {
  const ranges = entropyRange(trace.tokens, trace.layers);
  const spans = trace.tokens.map((tok, i) => {
    const span = el("span", `tok ${tok.prompt ? "prompt" : "gen"}${tok.eos ? " eos" : ""}`, tok.eos ? "" : tok.text);
    const p = tokenPaint(trace, tok, view, ranges);
    span.style.background = p.bg;
    span.style.color = p.fg;
    span.dataset.index = String(i);
    span.tabIndex = i === 0 ? 0 : -1;
    if (tok.ops) tok.ops.forEach((op, l) => span.setAttribute(`data-op-layer-${l + 1}`, trace.names[op]));
    if (tok.logprob !== null) span.dataset.logprob = String(tok.logprob);
    if (!tok.prompt && i > 0 && trace.tokens[i - 1].prompt) span.classList.add("boundary");
    const focus = () => details.replaceChildren(describe(trace, tok, i, ranges));
    span.addEventListener("mouseenter", focus);
    span.addEventListener("focus", focus);
    span.addEventListener("click", () => span.focus());
    return span;
  });
  container.replaceChildren(...spans);
  details.textContent = "Hover, tap or focus a token for its routing and surprisal.";
  container.onkeydown = (e) => {  // roving focus: one tab stop, arrows move
    const i = Number(document.activeElement?.dataset?.index);
    if (Number.isNaN(i)) return;
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: spans.length - 1 }[e.key];
    if (to === undefined || !spans[to]) return;
    e.preventDefault();
    spans[i].tabIndex = -1;
    spans[to].tabIndex = 0;
    spans[to].focus();
  };
}

// Tokens x layers: one column per token (scrolls), one row per layer, then surprisal; row ends give the
// layer's attention share.
export function renderGrid(grid, caption, trace) {
  const ranges = entropyRange(trace.tokens, trace.layers);
  const shares = attentionShares(trace);
  const n = trace.tokens.length;
  grid.style.gridTemplateColumns = `auto repeat(${n}, 1.4em) auto`;
  const cells = [el("div", "corner", "layer \\ token")];
  trace.tokens.forEach((tok, i) => {
    const head = el("div", "colhead" + (!tok.prompt && i > 0 && trace.tokens[i - 1].prompt ? " boundary" : ""), tok.eos ? "EOS" : tok.text);
    head.title = `token ${i + 1} ${show(tok.text)}`;
    cells.push(head);
  });
  cells.push(el("div", "corner", "attention"));
  const row = (label, paintOf, end, extra) => {
    cells.push(el("div", "rowhead", label));
    trace.tokens.forEach((tok, i) => {
      const c = el("div", "cell" + (!tok.prompt && i > 0 && trace.tokens[i - 1].prompt ? " boundary" : ""));
      const p = paintOf(tok);
      c.style.background = p.bg;
      c.dataset.token = String(i);
      extra?.(c, tok);
      cells.push(c);
    });
    cells.push(el("div", "rowend", end));
  };
  for (let l = 0; l < trace.layers; l++) {
    const kind = l === 0 && trace.metarouter ? " (gate)" : trace.routingLayers.includes(l) ? "" : " (fixed)";
    row(`${l + 1}${kind}`, (tok) => layerPaint(trace, tok, l, ranges), shares[l] === null ? "" : `${(shares[l] * 100).toFixed(0)}%`,
      (c, tok) => { c.dataset.layer = String(l + 1); if (tok.ops) c.dataset.op = trace.names[tok.ops[l]]; });
  }
  row("surprisal", (tok) => tokenPaint(trace, tok, "surprisal", ranges), "", (c, tok) => { c.dataset.layer = "surprisal"; });
  grid.replaceChildren(...cells);
  const routed = shares.filter((s) => s !== null);
  const mean = routed.length ? routed.reduce((a, b) => a + b, 0) / routed.length : null;
  caption.textContent = (mean === null ? "No routing layers. " : `Attention share over routing layers: ${(mean * 100).toFixed(1)}%. `) +
    (trace.flops ? `FLOPs for this text: ${(trace.flops.ratio * 100).toFixed(1)}% of the dense baseline's (${((1 - trace.flops.ratio) * 100).toFixed(1)}% saved).`
      : "") +
    (trace.promptCount < n ? " The bar marks where the generation starts." : "");
}
