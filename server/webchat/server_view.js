// The whole server: the engine's and the expert cache's live counters, read from /metrics (the
// Prometheus text every scraper sees), and the cache occupancy per MoE layer.
import { getText, parseMetrics } from "./api.js";

const ROWS = [
  ["engine up", "moeserve_engine_up"],
  ["requests running", "moeserve_running_batch_size"],
  ["requests queued", "moeserve_queue_depth"],
  ["requests finished", "moeserve_engine_requests_finished_total"],
  ["requests aborted", "moeserve_engine_requests_aborted_total"],
  ["requests failed", "moeserve_engine_requests_failed_total"],
  ["prompt tokens computed", "moeserve_engine_prompt_tokens_total"],
  ["prompt tokens cached", "moeserve_engine_prompt_tokens_cached_total"],
  ["generated tokens", "moeserve_engine_generated_tokens_total"],
  ["expert hits", "moeserve_expert_cache_hits_total"],
  ["expert misses", "moeserve_expert_cache_misses_total"],
  ["hit rate", "moeserve_expert_cache_hit_rate", (v) => (100 * v).toFixed(1) + "%"],
  ["read from disk", "moeserve_expert_cache_bytes_disk_total", bytes],
  ["stall", "moeserve_expert_cache_stall_seconds_total", (v) => v.toFixed(2) + " s"],
  ["evictions", "moeserve_expert_cache_evictions_total"],
  ["prefetches issued", "moeserve_expert_cache_prefetch_issued_total"],
  ["prefetches used", "moeserve_expert_cache_prefetch_used_total"],
  ["prefetches wasted", "moeserve_expert_cache_prefetch_wasted_total"],
  ["resident expert bytes", "moeserve_expert_cache_resident_bytes", bytes],
  ["expert budget", "moeserve_expert_cache_budget_bytes", bytes],
  ["bits per expert weight", "moeserve_expert_cache_expert_bits_per_weight"],
];

function bytes(v) {
  for (const [unit, size] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) if (v >= size) return (v / size).toFixed(2) + " " + unit;
  return v + " B";
}

function one(m, name) { return m[name] && m[name].length ? m[name][0].value : null; }

function perLayer(m, name) {
  const out = [];
  for (const s of m[name] || []) out[Number(s.labels.layer)] = s.value;
  return out;
}

export class ServerView {
  constructor(doc, shape, onError) {
    this.doc = doc;
    this.shape = shape;
    this.onError = onError;
    this.timer = null;
  }
  start() {
    if (this.timer) return;
    this.refresh();
    this.timer = setInterval(() => this.refresh(), 2000);
  }
  stop() { clearInterval(this.timer); this.timer = null; }
  async refresh() {
    let m;
    try {
      m = parseMetrics(await getText("/metrics"));
    } catch (err) {
      this.onError(err);
      return;
    }
    const table = this.doc.getElementById("counters");
    table.replaceChildren();
    for (const [label, name, fmt] of ROWS) {
      const v = one(m, name);
      if (v == null) continue;          // e.g. no cache counters on an all-resident server
      const tr = table.insertRow();
      tr.insertCell().textContent = label;
      const td = tr.insertCell();
      td.className = "v";
      td.textContent = fmt ? fmt(v) : String(v);
    }
    const E = this.shape.experts || 1;
    const resident = perLayer(m, "moeserve_expert_cache_layer_resident_experts");
    const hits = perLayer(m, "moeserve_expert_cache_layer_hits_total");
    const misses = perLayer(m, "moeserve_expert_cache_layer_misses_total");
    const box = this.doc.getElementById("occupancy");
    box.replaceChildren();
    resident.forEach((n, l) => {
      const row = document.createElement("div");
      row.className = "row";
      row.dataset.layer = l;
      const name = document.createElement("span");
      name.textContent = `layer ${l}`;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.title = `${n} of ${E} experts resident`;
      const fill = document.createElement("i");
      fill.style.width = (100 * n / E).toFixed(1) + "%";
      bar.appendChild(fill);
      const rate = document.createElement("span");
      const h = hits[l] || 0, mi = misses[l] || 0;
      rate.textContent = h + mi ? (100 * h / (h + mi)).toFixed(0) + "% hits" : "";
      row.append(name, bar, rate);
      box.appendChild(row);
    });
    this.doc.getElementById("server-updated").textContent = "updated " + new Date().toLocaleTimeString();
  }
}
