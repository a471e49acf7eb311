// Playground: stream /v1/generate (SSE over fetch) and draw the routing heatmap from return_routing.
"use strict";
const OP_COLOURS = { identity: [120, 120, 120], dct: [60, 130, 230], rbf: [80, 200, 120], attention: [245, 150, 40] };
const $ = (id) => document.getElementById(id);
let controller = null;
let routing = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    $("model").textContent = r.ok ? `${body.data[0].id} (${body.data[0].arch}, context ${body.data[0].max_model_len})` : body.error.message;
  } catch (e) { $("model").textContent = String(e); }
}

function legend() {
  $("legend").innerHTML = Object.entries(OP_COLOURS)
    .map(([name, c]) => `<span><i style="background: rgb(${c.join(",")})"></i>${name}</span>`).join("") +
    `<span><i style="background: rgb(200,60,200)"></i>MetaRouter gate</span>`;
}

async function generate() {
  const body = {
    prompt: $("prompt").value,
    max_new_tokens: numberOrNull("max_new_tokens") ?? 64,
    temperature: numberOrNull("temperature") ?? 1.0,
    top_p: numberOrNull("top_p"),
    seed: numberOrNull("seed"),
    stream: true,
    return_routing: true,
  };
  $("output").textContent = "";
  $("stats").textContent = "";
  $("status").textContent = "running…";
  $("generate").disabled = true;
  $("stop").disabled = false;
  controller = new AbortController();
  try {
    const r = await fetch("/v1/generate", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      const err = await r.json();
      $("status").textContent = `${r.status}: ${err.error.message}`;
      return;
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        handle(JSON.parse(data));
      }
    }
    $("status").textContent = "done";
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "stopped" : String(e);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

function handle(event) {
  if (event.type === "token") {
    $("output").textContent += event.text;
  } else if (event.type === "done") {
    const t = event.timing, f = event.flops;
    $("stats").textContent = `${event.usage.completion_tokens} tokens, finish: ${event.finish_reason}, ` +
      `TTFT ${(t.time_to_first_token_seconds * 1000).toFixed(1)} ms, total ${(t.total_seconds * 1000).toFixed(1)} ms, ` +
      `FLOPs ${(f.ratio * 100).toFixed(1)}% of dense`;
    routing = event.routing;
    draw();
  } else if (event.error) {
    $("status").textContent = event.error.message;
  }
}

function draw() {
  if (!routing) return;
  const canvas = $("heatmap");
  const rows = routing.operator.length, layers = routing.operator[0].length;
  const cell = Math.max(4, Math.min(24, Math.floor(780 / (layers + 1))));
  const rowH = Math.max(3, Math.min(14, Math.floor(4000 / rows)));
  canvas.width = (layers + 1) * cell + 2;
  canvas.height = rows * rowH + 2;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let t = 0; t < rows; t++) {
    for (let l = 0; l < layers; l++) {
      const name = routing.operator_names[routing.operator[t][l]] ?? "identity";
      const ent = routing.entropy[t][l];
      const k = ent === null ? 0.75 : 0.35 + 0.65 * ent;
      const c = OP_COLOURS[name].map((v) => Math.round(v * k));
      ctx.fillStyle = `rgb(${c.join(",")})`;
      ctx.fillRect(1 + l * cell, 1 + t * rowH, cell - 1, rowH - 1);
    }
    const g = routing.gate[t];
    ctx.fillStyle = g === null ? "#222" : `rgba(200, 60, 200, ${g})`;
    ctx.fillRect(1 + layers * cell, 1 + t * rowH, cell - 1, rowH - 1);
    if (t === routing.prompt_tokens) {
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, t * rowH, canvas.width, 1);
    }
  }
  canvas.onmousemove = (e) => {
    const rect = canvas.getBoundingClientRect();
    const x = (e.clientX - rect.left) * (canvas.width / rect.width), y = (e.clientY - rect.top) * (canvas.height / rect.height);
    const t = Math.floor((y - 1) / rowH), l = Math.floor((x - 1) / cell);
    if (t < 0 || t >= rows || l < 0 || l > layers) return;
    const tok = JSON.stringify(routing.tokens[t]);
    const where = t < routing.prompt_tokens ? "prompt" : "generated";
    if (l === layers) {
      $("hover").textContent = `token ${t} ${tok} (${where}): MetaRouter gate ${routing.gate[t]?.toFixed(3) ?? "n/a"}`;
    } else {
      const ent = routing.entropy[t][l];
      $("hover").textContent = `token ${t} ${tok} (${where}), layer ${l + 1}: ` +
        `${routing.operator_names[routing.operator[t][l]]}, entropy ${ent === null ? "n/a" : ent.toFixed(3)}`;
    }
  };
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
legend();
loadModel();
