// One request's tokens as the views draw them, built from the API's answers.
// A token: {text, prompt, eos, ops (operator id per layer, or null), ent, gate, logprob (null: not predicted)}.

// Token pieces as text. The server writes a piece that is not whole UTF-8 as "bytes:\xe2\x80";
// one streaming decoder over all pieces gives each token the characters that complete in it, so the
// pieces concatenate to the text even where a character spans tokens.
export function pieceTexts(pieces) {
  const decoder = new TextDecoder("utf-8");
  const encoder = new TextEncoder();
  return pieces.map((piece) => {
    const bytes = piece.startsWith("bytes:")
      ? Uint8Array.from(piece.slice(6).split("\\x").filter(Boolean), (h) => parseInt(h, 16))
      : encoder.encode(piece);
    return decoder.decode(bytes, { stream: true });
  });
}

function fromRouting(routing) {
  const layers = routing.operator.length ? routing.operator[0].length : routing.thresholds.length;
  return {
    names: routing.operator_names,
    thresholds: routing.thresholds,
    layers,
    routingLayers: routing.thresholds.map((c, l) => (c.length ? l : -1)).filter((l) => l >= 0),
    metarouter: routing.gate.some((g) => g !== null),
  };
}

// /v1/generate's done event (return_routing + return_logprobs) and the streamed text of each generated token.
// BOS is left out: it is context, never text.
export function generationTrace(done, pieces) {
  const r = done.routing;
  const ids = [...r.token_ids.slice(0, r.prompt_tokens), ...done.token_ids];
  const promptTexts = pieceTexts(r.tokens.slice(0, r.prompt_tokens));
  const tokens = [];
  for (let i = 1; i < ids.length; i++) {
    const prompt = i < r.prompt_tokens;
    const routed = i < r.operator.length;
    tokens.push({
      text: prompt ? promptTexts[i] : pieces[i - r.prompt_tokens] ?? "",
      prompt, eos: !prompt && i === ids.length - 1 && done.finish_reason === "eos",
      ops: routed ? r.operator[i] : null, ent: routed ? r.entropy[i] : null, gate: routed ? r.gate[i] : null,
      logprob: done.logprobs ? done.logprobs[i] : null,
    });
  }
  return { ...fromRouting(r), model: done.model, tokens, promptCount: r.prompt_tokens - 1, flops: done.flops, timing: done.timing };
}

// One /v1/perplexity result (return_logprobs + return_routing): every token of the text is predicted.
export function perplexityTrace(body, result) {
  const r = result.token_routing;
  const texts = pieceTexts(result.logprobs.map((lp) => lp.token));
  const tokens = result.logprobs.map((lp, k) => {
    const i = k + 1; // position in the sequence (BOS = 0)
    const routed = i < r.operator.length;
    return { text: texts[k], prompt: true, eos: false, ops: routed ? r.operator[i] : null, ent: routed ? r.entropy[i] : null,
      gate: routed ? r.gate[i] : null, logprob: lp.logprob };
  });
  return { ...fromRouting(r), model: body.model, tokens, promptCount: tokens.length, flops: result.flops, timing: body.timing, result };
}

// Share of each layer's routed tokens sent to attention (null where the layer does not route).
export function attentionShares(trace) {
  return Array.from({ length: trace.layers }, (_, l) => {
    if (!trace.routingLayers.includes(l)) return null;
    const ops = trace.tokens.filter((t) => t.ops).map((t) => trace.names[t.ops[l]]);
    return ops.length ? ops.filter((n) => n === "attention").length / ops.length : null;
  });
}
