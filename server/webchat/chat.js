// Conversations in the browser's local storage, and an answer's rendering: Markdown (marked,
// sanitised by DOMPurify: a model's output is untrusted) with each character mapped back to the
// token that produced it, so hovering the answer can show that token's experts.

const STORE = "moeserve.conversations";
const MAX_CONVERSATIONS = 50;

export class Conversations {
  constructor() {
    try { this.list = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch (_) { this.list = []; }
    if (!Array.isArray(this.list)) this.list = [];
    this.currentId = this.list.length ? this.list[0].id : null;
  }
  get current() { return this.list.find((c) => c.id === this.currentId) || null; }
  create() {
    const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [] };
    this.list.unshift(c);
    this.list.length = Math.min(this.list.length, MAX_CONVERSATIONS);
    this.currentId = c.id;
    this.save();
    return c;
  }
  remove(id) {
    this.list = this.list.filter((c) => c.id !== id);
    if (this.currentId === id) this.currentId = this.list.length ? this.list[0].id : null;
    this.save();
  }
  save() {
    // text and timings only: per-token expert data lives in memory for the current answer
    const plain = this.list.map((c) => ({ ...c, messages: c.messages.map(({ id, role, content, reasoning, meta, error }) => ({ id, role, content, reasoning, meta, error })) }));
    try { localStorage.setItem(STORE, JSON.stringify(plain)); } catch (_) { /* storage full: keep going */ }
  }
}

// the messages the API gets: the system prompt, then the conversation without errors
export function apiMessages(conv, system) {
  const out = system ? [{ role: "system", content: system }] : [];
  for (const m of conv.messages) if (!m.error && (m.role === "user" || m.role === "assistant")) out.push({ role: m.role, content: m.content });
  return out;
}

function markdown(text) {
  const html = window.marked ? window.marked.parse(text, { gfm: true, breaks: true }) : null;
  if (html == null || !window.DOMPurify) return null;
  return window.DOMPurify.sanitize(html);
}

// Wrap the rendered text in spans carrying the token index (data-t) of the source character
// each rendered character came from: rendered text is (nearly) a subsequence of the Markdown
// source, so a forward greedy match with a bounded look-ahead aligns the two.
function alignTokens(el, source, owner) {
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  let ptr = 0;
  for (const node of nodes) {
    const text = node.nodeValue;
    const ids = new Int32Array(text.length).fill(-1);
    for (let i = 0; i < text.length; i++) {
      const lim = Math.min(source.length, ptr + 48);
      let q = ptr;
      while (q < lim && source[q] !== text[i]) q++;
      if (q < lim) { ids[i] = owner[q]; ptr = q + 1; }
    }
    const frag = document.createDocumentFragment();
    for (let i = 0; i < text.length;) {
      let j = i;
      while (j < text.length && ids[j] === ids[i]) j++;
      const part = text.slice(i, j);
      if (ids[i] >= 0) {
        const span = document.createElement("span");
        span.className = "tok";
        span.dataset.t = ids[i];
        span.textContent = part;
        frag.appendChild(span);
      } else frag.appendChild(document.createTextNode(part));
      i = j;
    }
    node.replaceWith(frag);
  }
}

// msg.content: the text; msg.spans: [[start, end, token], ...] offsets of each token's text
export function renderMessage(el, msg) {
  el.className = "msg " + (msg.error ? "error" : msg.role);
  el.replaceChildren();
  if (msg.reasoning) {   // a thinking model's reasoning, folded above its answer
    const box = document.createElement("details");   // rebuilt per frame: its open state lives on msg
    box.className = "thinking";
    box.open = !!msg.reasoningOpen;
    box.addEventListener("toggle", () => { msg.reasoningOpen = box.open; });
    const head = document.createElement("summary");
    head.textContent = msg.streaming && !msg.content ? "Thinking…" : "Thought";
    const text = document.createElement("div");
    text.textContent = msg.reasoning;
    box.append(head, text);
    el.appendChild(box);
  }
  const body = document.createElement("div");
  body.className = "body";
  if (msg.role === "assistant" && !msg.error) {
    const html = markdown(msg.content || "");
    if (html != null) body.innerHTML = html; else body.textContent = msg.content || "";
    if (msg.spans && msg.spans.length) {
      const owner = new Int32Array((msg.content || "").length).fill(-1);
      for (const [a, b, t] of msg.spans) owner.fill(t, a, b);
      alignTokens(body, msg.content || "", owner);
    }
  } else {
    body.textContent = msg.content || "";
  }
  el.appendChild(body);
  if (msg.meta) {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = msg.meta;
    el.appendChild(meta);
  }
}

export function titleOf(text) {
  const t = text.replace(/\s+/g, " ").trim();
  return t.length > 40 ? t.slice(0, 40) + "…" : t || "New chat";
}
