// The page's only ways to the server: the public OpenAI routes, /health and /metrics, with the
// API key (when the server has one) from local storage.

const KEY_STORE = "moeserve.apiKey";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
  get isAuth() { return this.status === 401; }
}

export function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }
export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
}

function headers(extra) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function failure(resp) {
  // the server's errors are OpenAI envelopes: {"error": {"message", "type", "code"}}
  let message = `${resp.status} ${resp.statusText}`, code = null;
  try {
    const body = await resp.json();
    if (body && body.error) { message = body.error.message || message; code = body.error.code; }
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(resp.status, message, code);
}

export async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

export async function getText(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  return resp.text();
}

// POST /v1/chat/completions with stream: true; calls onChunk(obj) for every SSE data event.
// Resolves when the stream ends ([DONE]); rejects with ApiError on an HTTP or in-stream error,
// or with the AbortError of `signal` (the Stop button).
export async function streamChat(body, signal, onChunk) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", signal, body: JSON.stringify({ ...body, stream: true }),
    headers: headers({ "Content-Type": "application/json" }),
  });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {     // one SSE event per blank line
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;                          // keep-alive comment
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new ApiError(500, obj.error.message || "stream error", obj.error.code);
      onChunk(obj);
    }
  }
  throw new ApiError(0, "the stream ended without [DONE] (the server went away?)");
}

// Prometheus text -> {name: [{labels: {...}, value}]}
export function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const kv of m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    (out[m[1]] = out[m[1]] || []).push({ labels, value: Number(m[3]) });
  }
  return out;
}
