// Colour mapping of the chiaroscuro view (docs/ARCHITECTURE.md, "Playground"): light = attention,
// dark = DCT mixing; brightness within each band = the layer's entropy, min-max normalised per request.
export const SURPRISAL_MAX_BITS = 16; // fixed scale, so two models' panes compare

function hslToRgb(h, s, l) {
  s /= 100; l /= 100;
  const k = (n) => (n + h / 30) % 12;
  const a = s * Math.min(l, 1 - l);
  const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)));
  return [f(0), f(8), f(4)].map((v) => Math.round(v * 255));
}

function luminance([r, g, b]) {
  const lin = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
}

// Background plus black or white text, whichever contrasts more (always >= 4.5:1).
function paint(h, s, l) {
  const rgb = hslToRgb(h, s, l);
  const y = luminance(rgb);
  return { bg: `rgb(${rgb.join(",")})`, fg: (y + 0.05) / 0.05 >= 1.05 / (y + 0.05) ? "#000" : "#fff" };
}

export const NEUTRAL = paint(0, 0, 30);
export const TONES = {
  attention: (e) => paint(42, 70, 72 + 22 * e),   // light, warm: 72-94 % lightness
  dct: (e) => paint(228, 35, 10 + 20 * e),        // dark, cool: 10-30 %
  rbf: (e) => paint(160, 40, 40 + 12 * e),        // mid, green: 40-52 % (three-operator models)
  identity: () => paint(0, 0, 45),
  gate: (g) => paint(285, 45, 12 + 78 * g),       // layer 1: MetaRouter gate (min-max normalised), violet, light = high
  fixed: () => paint(42, 15, 80),                 // layer L: always full attention
  share: (a) => paint(40, 30, 10 + 84 * a),       // all routing layers: share sent to attention
  surprisal: (bits) => paint(8, 75, 96 - 56 * Math.min(bits / SURPRISAL_MAX_BITS, 1)),
};

// Per-layer [min, max] of the entropies in this request (nulls skipped); `.gate`: the same for the gate.
export function entropyRange(tokens, layers) {
  const range = Array.from({ length: layers }, () => [Infinity, -Infinity]);
  range.gate = [Infinity, -Infinity];
  const widen = (r, v) => { if (v !== null && v !== undefined) { r[0] = Math.min(r[0], v); r[1] = Math.max(r[1], v); } };
  for (const t of tokens) {
    if (!t.ent) continue;
    t.ent.forEach((e, l) => widen(range[l], e));
    widen(range.gate, t.gate);
  }
  return range;
}

export function normalised(e, [lo, hi]) {
  if (e === null || !(hi > lo)) return 0.5;
  return (e - lo) / (hi - lo);
}

export const bits = (logprob) => -logprob / Math.LN2;

// Colour of one token under a view: "all", "surprisal" or a 0-based layer index.
export function tokenPaint(trace, tok, view, ranges) {
  if (view === "surprisal") return tok.logprob === null ? NEUTRAL : TONES.surprisal(bits(tok.logprob));
  if (!tok.ops) return NEUTRAL;
  if (view === "all") {
    const routed = trace.routingLayers.map((l) => trace.names[tok.ops[l]]);
    return routed.length ? TONES.share(routed.filter((n) => n === "attention").length / routed.length) : NEUTRAL;
  }
  return layerPaint(trace, tok, view, ranges);
}

export function layerPaint(trace, tok, layer, ranges) {
  if (!tok.ops) return NEUTRAL;
  if (layer === 0 && trace.metarouter) return tok.gate === null ? NEUTRAL : TONES.gate(normalised(tok.gate, ranges.gate));
  const name = trace.names[tok.ops[layer]];
  if (!trace.routingLayers.includes(layer)) return name === "attention" ? TONES.fixed() : (TONES[name] ?? TONES.identity)(0.5);
  return (TONES[name] ?? TONES.identity)(normalised(tok.ent[layer], ranges[layer]));
}
