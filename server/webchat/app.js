// The chat page: wiring of the conversation list, the composer, streaming answers, settings,
// the API key and the two views (chat with its expert panel; the whole server).
import { ApiError, apiKey, getJSON, setApiKey, streamChat } from "./api.js";
import { Conversations, apiMessages, renderMessage, titleOf } from "./chat.js";
import { ExpertView } from "./experts.js";
import { ServerView } from "./server_view.js";

const $ = (id) => document.getElementById(id);
const SETTINGS = "moeserve.settings";
const state = { model: null, shape: null, view: null, server: null, controller: null, convs: new Conversations() };

function settings() {
  try { return JSON.parse(localStorage.getItem(SETTINGS) || "{}"); } catch (_) { return {}; }
}

function notice(text) {
  const el = $("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

// ---- API key: asked once, when the server first answers 401 ---------------------------------
let keyWaiters = [];
function askKey(err) {
  const had = !!apiKey();
  $("key-why").textContent = had
    ? `The server rejected the stored API key (${err.message}). Enter the key the server was started with (--api-key).`
    : "This server needs an API key (it was started with --api-key).";
  notice(had ? "Wrong API key: the server answered 401 Unauthorized." : "This server needs an API key.");
  $("key-input").value = "";
  if (!$("keydlg").open) $("keydlg").showModal();
  return new Promise((resolve) => keyWaiters.push(resolve));
}
$("keydlg").addEventListener("close", () => {
  if ($("keydlg").returnValue === "save" && $("key-input").value) setApiKey($("key-input").value.trim());
  const waiters = keyWaiters; keyWaiters = [];
  waiters.forEach((w) => w($("keydlg").returnValue === "save"));
});

async function withKey(fn) {
  for (;;) {
    try { return await fn(); } catch (err) {
      if (!(err instanceof ApiError) || !err.isAuth) throw err;
      if (!(await askKey(err))) throw err;
    }
  }
}

// ---- start-up: wait for the engine, then read the model's shape -----------------------------
async function health() {
  const el = $("health");
  try {
    const r = await fetch("/health");
    const body = await r.json();
    el.textContent = body.status;
    el.className = "health " + (r.ok ? "ok" : "bad");
    return r.ok;
  } catch (_) {
    el.textContent = "unreachable"; el.className = "health bad";
    return false;
  }
}

async function init() {
  renderConversations();
  renderMessages();
  while (!(await health())) await new Promise((r) => setTimeout(r, 2000));
  setInterval(health, 5000);
  let models;
  try { models = await withKey(() => getJSON("/v1/models")); } catch (err) { notice(err.message); return; }
  notice("");
  const card = models.data[0];
  state.model = card.id;
  state.shape = card.moeserve || { moe_layers: 0, experts: 0 };
  $("model").textContent = card.id + (state.shape.experts ? ` · ${state.shape.moe_layers} MoE layers x ${state.shape.experts} experts, top-${state.shape.top_k}` : "");
  if (state.shape.experts) state.view = new ExpertView(document, state.shape);
  else $("experts").hidden = true;
  state.server = new ServerView(document, state.shape, (err) => notice("server view: " + err.message));
  document.body.dataset.ready = "1";
}

// ---- conversations and messages --------------------------------------------------------------
function renderConversations() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of state.convs.list) {
    const li = document.createElement("li");
    li.className = c.id === state.convs.currentId ? "active" : "";
    const name = document.createElement("span");
    name.textContent = c.title;
    const del = document.createElement("button");
    del.textContent = "×"; del.title = "delete this chat";
    del.onclick = (ev) => { ev.stopPropagation(); state.convs.remove(c.id); renderConversations(); renderMessages(); };
    li.onclick = () => { if (state.controller) return; state.convs.currentId = c.id; renderConversations(); renderMessages(); };
    li.append(name, del);
    ul.appendChild(li);
  }
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const conv = state.convs.current;
  for (const m of conv ? conv.messages : []) {
    const el = document.createElement("div");
    el.dataset.id = m.id;
    renderMessage(el, m);
    box.appendChild(el);
  }
  box.scrollTop = box.scrollHeight;
  $("regenerate").disabled = !!state.controller || !conv || !conv.messages.some((m) => m.role === "user");
}

function messageEl(msg) { return $("messages").querySelector(`[data-id="${msg.id}"]`); }

let frame = null;
function rerender(msg) {   // at most once per animation frame while tokens stream in
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = null;
    const el = messageEl(msg);
    if (el) renderMessage(el, msg);
    $("messages").scrollTop = $("messages").scrollHeight;
  });
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("regenerate").disabled = on;
}

function newId() { return Math.random().toString(36).slice(2, 10); }

async function generate(conv) {
  const answer = { id: newId(), role: "assistant", content: "", spans: [], reasoning: "", streaming: true };
  const history = apiMessages(conv, settings().system);
  conv.messages.push(answer);
  renderMessages();
  const s = settings();
  const body = { model: state.model, messages: history, stream_options: { include_usage: true } };
  for (const k of ["temperature", "top_p", "max_tokens", "seed"]) if (s[k] !== undefined && s[k] !== "") body[k] = Number(s[k]);
  const watch = state.view && $("watch").checked;
  if (watch) { body.moeserve = { experts: true }; state.view.reset(); }
  state.controller = new AbortController();
  busy(true);
  const t0 = performance.now();
  let first = null, last = null, usage = null, lastToken = 0, reason = null;
  const onChunk = (chunk) => {
    if (chunk.usage) usage = chunk.usage;
    if (chunk.moeserve) { lastToken = chunk.moeserve.token; if (watch) state.view.add(chunk.moeserve); }
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return;
    if (choice.finish_reason) reason = choice.finish_reason;
    const thought = choice.delta && choice.delta.reasoning_content;   // a thinking model's reasoning
    const text = choice.delta && choice.delta.content;
    if (!text && !thought) return;
    last = performance.now();
    if (first == null) first = last;
    if (thought) { answer.reasoning += thought; rerender(answer); }
    if (!text) return;
    const start = answer.content.length;
    answer.content += text;
    answer.spans.push([start, answer.content.length, lastToken]);   // text released by that token
    rerender(answer);
  };
  try {
    await withKey(() => { answer.content = ""; answer.spans = []; answer.reasoning = ""; return streamChat(body, state.controller.signal, onChunk); });
    notice("");
  } catch (err) {
    if (err.name === "AbortError") reason = "stopped";
    else { answer.error = true; answer.content = (answer.content ? answer.content + "\n\n" : "") + "Error: " + err.message; }
  } finally {
    const n = usage ? usage.completion_tokens : answer.spans.length;
    const parts = [];
    if (first != null) parts.push(`TTFT ${((first - t0) / 1000).toFixed(2)} s`);
    if (first != null && last > first && n > 1) parts.push(`${((n - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
    parts.push(`${n} tokens`);
    if (reason) parts.push(reason === "stop" ? "done" : reason);
    answer.meta = parts.join(" · ");
    answer.streaming = false;
    $("speed").textContent = answer.meta;
    state.controller = null;
    busy(false);
    state.convs.save();
    const el = messageEl(answer);
    if (el) renderMessage(el, answer);
    renderMessages();
  }
}

async function send(text) {
  const conv = state.convs.current || state.convs.create();
  if (!conv.messages.length) conv.title = titleOf(text);
  conv.messages.push({ id: newId(), role: "user", content: text });
  state.convs.save();
  renderConversations();
  await generate(conv);
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller || !state.model) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("regenerate").addEventListener("click", () => {
  const conv = state.convs.current;
  if (!conv || state.controller) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role !== "user") conv.messages.pop();
  if (conv.messages.length) generate(conv);
});
$("new-chat").addEventListener("click", () => {
  if (state.controller) return;
  state.convs.create(); renderConversations(); renderMessages();
  if (state.view) state.view.reset();
});

// hovering a token of an answer shows its experts (the latest answer's, which the view holds)
$("messages").addEventListener("mouseover", (ev) => {
  const t = ev.target.closest && ev.target.closest(".tok");
  if (!t || !state.view) return;
  document.querySelectorAll(".tok.sel").forEach((x) => x.classList.remove("sel"));
  t.classList.add("sel");
  state.view.highlight(Number(t.dataset.t));
});
$("messages").addEventListener("mouseleave", () => {
  document.querySelectorAll(".tok.sel").forEach((x) => x.classList.remove("sel"));
  if (state.view) state.view.highlight(null);
});

// ---- tabs and settings -----------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    $("view-chat").hidden = tab.dataset.view !== "chat";
    $("view-server").hidden = tab.dataset.view !== "server";
    if (!state.server) return;
    if (tab.dataset.view === "server") state.server.start(); else state.server.stop();
  });
}
$("open-settings").addEventListener("click", () => {
  const s = settings();
  for (const el of $("settings-form").elements) if (el.name) el.value = s[el.name] ?? "";
  $("settings").showModal();
});
$("settings").addEventListener("close", () => {
  if ($("settings").returnValue !== "save") return;
  const s = {};
  for (const el of $("settings-form").elements) if (el.name && el.value !== "") s[el.name] = el.value;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
});

init();
