// The live expert view: layers x experts heatmaps (prompt and decode apart, rows routed as
// colour), each cell marked with what the cache did for the shown token, and per-token strip
// charts of decode hit rate, bytes read and stall time. Fed the `moeserve` object of streamed chunks.

const MARKS = ["hit", "pref", "miss", "pf", "evict", "sel"];
const STATUS_CLASS = { h: "hit", p: "pref", m: "miss" };
const STRIP_TOKENS = 160;

function bits(hex, E) {   // hex bit mask -> Uint8Array of E flags (BigInt: E may exceed 53)
  const out = new Uint8Array(E);
  let v = BigInt("0x" + (hex || "0"));
  for (let e = 0; e < E && v > 0n; e++, v >>= 1n) out[e] = Number(v & 1n);
  return out;
}

class Grid {
  constructor(root, L, E) {
    this.L = L; this.E = E;
    root.replaceChildren();
    root.style.gridTemplateColumns = `18px repeat(${E}, var(--cell))`;
    // cells sized to the model: a 30 x 8 grid gets wide cells, a 30 x 64 one narrow ones
    root.style.setProperty("--cell", Math.max(5, Math.min(40, Math.floor(460 / E) - 1)) + "px");
    root.style.setProperty("--cell-h", Math.max(5, Math.min(14, Math.floor(300 / L) - 1)) + "px");
    this.cells = [];
    for (let l = 0; l < L; l++) {
      const lab = document.createElement("div");
      lab.className = "lab";
      lab.textContent = l % 5 === 0 ? String(l) : "";
      root.appendChild(lab);
      for (let e = 0; e < E; e++) {
        const c = document.createElement("div");
        c.className = "cell";
        c.dataset.l = l; c.dataset.e = e;
        c.title = `layer ${l}, expert ${e}`;
        root.appendChild(c);
        this.cells.push(c);
      }
    }
    this.counts = new Float64Array(L * E);
    this.marked = new Set();
  }
  add(layers) {   // [[e, rows, status], ...] per layer
    layers.forEach((layer, l) => { for (const [e, n] of layer) this.counts[l * this.E + e] += n; });
    this.paintCounts();
  }
  paintCounts() {
    let max = 0;
    for (const v of this.counts) if (v > max) max = v;
    this.counts.forEach((v, i) => {
      const c = this.cells[i];
      if (v > 0) {
        // square root: a few hot experts should not wash out the rest
        c.style.setProperty("--v", (0.15 + 0.85 * Math.sqrt(v / max)).toFixed(3));
        c.classList.add("hot");
        c.title = `layer ${c.dataset.l}, expert ${c.dataset.e}: ${v} rows`;
      }
    });
  }
  resident(masks) {
    masks.forEach((hex, l) => {
      const on = bits(hex, this.E);
      for (let e = 0; e < this.E; e++) this.cells[l * this.E + e].classList.toggle("res", !!on[e]);
    });
  }
  mark(entry) {   // the cache events of one token (or none)
    for (const i of this.marked) this.cells[i].classList.remove(...MARKS);
    this.marked.clear();
    if (!entry) return;
    const put = (l, e, cls) => {
      if (l >= this.L || e >= this.E) return;
      const i = l * this.E + e;
      this.cells[i].classList.add(cls);
      this.marked.add(i);
    };
    for (const [l, e] of entry.prefetched) put(l, e, "pf");
    for (const [l, e] of entry.evicted) put(l, e, "evict");
    entry.layers.forEach((layer, l) => { for (const [e, , s] of layer) put(l, e, STATUS_CLASS[s] || "hit"); });
  }
  clear() {
    this.counts.fill(0);
    for (const c of this.cells) {
      c.classList.remove("hot", "res", ...MARKS);
      c.style.removeProperty("--v");
      c.title = `layer ${c.dataset.l}, expert ${c.dataset.e}`;
    }
    this.marked.clear();
  }
}

function strip(canvas, values, max, color, fmt) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const shown = values.slice(-STRIP_TOKENS);
  const bw = w / STRIP_TOKENS;
  ctx.fillStyle = color;
  shown.forEach((v, i) => {
    const bh = max > 0 ? Math.max(v > 0 ? 1 : 0, (v / max) * (h - 12)) : 0;
    ctx.fillRect(i * bw, h - bh, Math.max(bw - 0.5, 0.5), bh);
  });
  ctx.fillStyle = "#6b6b73";
  ctx.font = "10px system-ui";
  const last = shown.length ? shown[shown.length - 1] : 0;
  ctx.fillText(`${fmt(last)} (max ${fmt(max)})`, 2, 10);
}

function mb(v) { return v >= 1e6 ? (v / 1e6).toFixed(1) + " MB" : v >= 1e3 ? (v / 1e3).toFixed(0) + " kB" : v + " B"; }

export class ExpertView {
  constructor(doc, shape) {
    this.doc = doc;
    this.shape = shape;     // {moe_layers, experts, top_k}
    const L = shape.moe_layers, E = shape.experts;
    this.prompt = new Grid(doc.getElementById("heat-prompt"), L, E);
    this.decode = new Grid(doc.getElementById("heat-decode"), L, E);
    this.info = doc.getElementById("token-info");
    this.reset();
  }
  reset() {
    this.entries = [];
    this.prompt.clear(); this.decode.clear();
    this.hit = []; this.bytes = []; this.stall = [];
    this.sums = { prompt: null, decode: { tokens: 0, hits: 0, misses: 0, bytes: 0, stall: 0 } };
    this.drawStrips();
    this.doc.getElementById("prompt-sum").textContent = "";
    this.doc.getElementById("decode-sum").textContent = "";
  }
  // one chunk's `moeserve` object
  add(entry) {
    this.entries[entry.token] = entry;
    const grid = entry.phase === "prompt" ? this.prompt : this.decode;
    grid.add(entry.layers);
    this.prompt.resident(entry.resident);
    this.decode.resident(entry.resident);
    const uses = entry.hits + entry.misses;
    if (entry.phase === "prompt") {
      this.sums.prompt = entry;
      this.doc.getElementById("prompt-sum").textContent =
        `${entry.hits} resident, ${entry.misses} loaded, ${mb(entry.bytes_read)} read, stall ${entry.stall_ms.toFixed(1)} ms`;
    } else {
      const s = this.sums.decode;
      s.tokens++; s.hits += entry.hits; s.misses += entry.misses; s.bytes += entry.bytes_read; s.stall += entry.stall_ms;
      this.doc.getElementById("decode-sum").textContent =
        `${s.tokens} tokens, hit rate ${(100 * s.hits / Math.max(1, s.hits + s.misses)).toFixed(0)}%, ` +
        `${mb(s.bytes / s.tokens)}/token, stall ${(s.stall / s.tokens).toFixed(1)} ms/token`;
    }
    if (entry.phase === "decode") {   // the prompt pass is summed above, not one of the bars
      this.hit.push(uses ? entry.hits / uses : 1);
      this.bytes.push(entry.bytes_read);
      this.stall.push(entry.stall_ms);
      this.drawStrips();
    }
    if (this.pinned == null) this.show(entry, grid);
  }
  drawStrips() {
    const d = this.doc;
    strip(d.getElementById("strip-hit"), this.hit, 1, "#2a9d3a", (v) => (100 * v).toFixed(0) + "%");
    strip(d.getElementById("strip-bytes"), this.bytes, Math.max(0, ...this.bytes), "#d6336c", mb);
    strip(d.getElementById("strip-stall"), this.stall, Math.max(0, ...this.stall), "#9b59d0", (v) => v.toFixed(1) + " ms");
  }
  show(entry, grid) {
    const other = grid === this.prompt ? this.decode : this.prompt;
    other.mark(null);
    grid.mark(entry);
    const what = entry.phase === "prompt" ? "prompt pass" : `token ${entry.token}`;
    const share = entry.batch > 1 ? ` (pass shared by ${entry.batch} requests)` : "";
    this.info.textContent = `${what}: ${entry.hits} experts resident, ${entry.misses} loaded, ` +
      `${mb(entry.bytes_read)} read, stall ${entry.stall_ms.toFixed(1)} ms, ` +
      `${entry.evicted.length} evicted, ${entry.prefetched.length} prefetched${share}`;
  }
  // hovering a token of the answer: show its experts (null: back to the latest)
  highlight(token) {
    this.pinned = token;
    const entry = token == null ? this.entries[this.entries.length - 1] : this.entries[token];
    if (!entry) return;
    this.show(entry, entry.phase === "prompt" ? this.prompt : this.decode);
  }
}
