// Talking to the server: JSON requests, the /v1/generate event stream, and errors in plain words.
const FIELD_NAMES = { prompt: "the prompt", text: "the text", max_new_tokens: "max tokens", temperature: "the temperature",
  top_p: "top-p", seed: "the seed", model: "the model" };

export class PlainError extends Error {}

export function headers() {
  const h = { "Content-Type": "application/json" };
  const key = document.getElementById("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// A server error as a sentence a person can act on (the server's own message kept after it).
export function plainWords(status, error, retryAfter) {
  const message = error?.message ?? "";
  const field = FIELD_NAMES[error?.param] ?? error?.param;
  if (status === 401) return "The server needs an API key, or the key is wrong: enter it in the API key field at the top.";
  if (error?.code === "context_length_exceeded") {
    return `Too long for this model: ${message.replace(/^[a-z_]+: /, "")}. Shorten ${field ?? "the input"}` +
      (error.param === "max_new_tokens" ? " or lower max tokens." : ".");
  }
  if (error?.code === "model_not_found" || status === 404) return `The server does not serve that model (${message}).`;
  if (status === 413) return "The text is larger than the server accepts in one request; send a shorter one.";
  if (status === 429 || status === 503) return `The server is busy; try again${retryAfter ? ` in ${retryAfter} s` : " shortly"}. (${message})`;
  if (status === 504 || error?.code === "timeout") return "The request took longer than the server allows and was stopped.";
  if (status === 400) return `The server refused the request: ${field ? field + " " : ""}${message.replace(/^[a-z_.0-9]+: /, "")}`;
  if (status >= 500) return `The server failed on this request: ${message || "no details"}.`;
  return `Request failed (HTTP ${status}): ${message}`;
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: a proxy's page */ }
  return new PlainError(plainWords(response.status, body?.error, response.headers.get("Retry-After")));
}

async function send(path, init) {
  try {
    return await fetch(path, { headers: headers(), ...init });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new PlainError("Could not reach the server: is it running, and is this page served by it?");
  }
}

export async function getJSON(path) {
  const r = await send(path, {});
  if (!r.ok) throw await failure(r);
  return r.json();
}

export async function postJSON(path, body, signal) {
  const r = await send(path, { method: "POST", body: JSON.stringify(body), signal });
  if (!r.ok) throw await failure(r);
  return r.json();
}

// POST /v1/generate with stream: true; onToken(event) per token event; resolves to the done event.
export async function streamGenerate(body, signal, onToken) {
  const r = await send("/v1/generate", { method: "POST", body: JSON.stringify({ ...body, stream: true }), signal });
  if (!r.ok) throw await failure(r);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", done = null;
  for (;;) {
    const { value, done: end } = await reader.read();
    if (end) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) throw new PlainError(plainWords(500, event.error));
      if (event.type === "token") onToken(event);
      else if (event.type === "done") done = event;
    }
  }
  if (!done) throw new PlainError("The server closed the stream before the generation finished.");
  return done;
}
