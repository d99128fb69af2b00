"""Measuring a built MoE checkpoint on held-out text: expert load, routing entropy, locality, perplexity.

Used for the model card while building. The attention/embedding/norm weights of the upcycled model are
the dense model's, so the dense LlamaForCausalLM's modules are run layer by layer with each FFN
replaced by a Mixtral block that reads its router and experts from the written safetensors, once per
layer for the whole padded batch (memory stays at one layer's experts even for 64 experts).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors import safe_open


def checkpoint_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file path, for single-file or sharded checkpoints."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(model_dir, v) for k, v in wm.items()}
    path = os.path.join(model_dir, "model.safetensors")
    with safe_open(path, framework="pt") as f:
        return {k: path for k in f.keys()}


def _read(files: dict[str, str], name: str) -> torch.Tensor:
    with safe_open(files[name], framework="pt") as f:
        return f.get_tensor(name).float()


class CheckpointMoE(torch.nn.Module):
    """Mixtral sparse block of layer ``layer``: softmax router, top-k, renormalise, SwiGLU experts."""

    def __init__(self, files: dict[str, str], layer: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.files, self.layer, self.experts, self.top_k = files, layer, experts, top_k
        self.routes: torch.Tensor | None = None  # [N, k] chosen experts, filled by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, H] real tokens only
        base = f"model.layers.{self.layer}.block_sparse_moe"
        logits = x @ _read(self.files, f"{base}.gate.weight").T  # [N, E]
        probs = torch.softmax(logits, dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)  # [N, k]
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for j in range(self.experts):
            rows, slot = torch.nonzero(idx == j, as_tuple=True)
            if rows.numel() == 0:
                continue
            w1, w2, w3 = (_read(self.files, f"{base}.experts.{j}.{n}.weight") for n in ("w1", "w2", "w3"))
            h = x[rows]  # [n, H]
            y = (torch.nn.functional.silu(h @ w1.T) * (h @ w3.T)) @ w2.T  # [n, H]
            out.index_add_(0, rows, y * w[rows, slot, None])
        self.routes = idx
        return out


def routing_summary(routes: list[torch.Tensor], lengths: list[int], experts: int) -> dict[str, Any]:
    """Per layer: load fractions, load entropy (nats), consecutive-token overlap vs independence.

    routes[l]: [N, k] chosen experts of all tokens, sequences concatenated with ``lengths``.
    """
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    same_seq = torch.ones(sum(lengths) - 1, dtype=torch.bool)  # pair (t, t+1) inside one sequence
    same_seq[(starts[1:] - 1).tolist()] = False
    layers = []
    for r in routes:
        counts = torch.bincount(r.flatten(), minlength=experts).double()  # [E]
        load = counts / counts.sum()
        entropy = float(-(load[load > 0] * load[load > 0].log()).sum())
        onehot = torch.zeros(r.shape[0], experts, dtype=torch.bool).scatter_(1, r, True)  # [N, E]
        shared = (onehot[1:] & onehot[:-1]).sum(-1)[same_seq].double()  # experts shared by t, t+1
        q = counts / r.shape[0]  # P(expert j chosen for a token)
        layers.append({"load": [round(float(v), 6) for v in load],
                       "entropy": round(entropy, 6),
                       "consecutive_shared": round(float(shared.mean()), 6),
                       "independent_shared": round(float((q * q).sum()), 6)})
    return {"max_entropy": round(math.log(experts), 6), "layers": layers}


def _layerwise_nll(model: Any, seqs: list[list[int]], mlps: list[Any], chunk: int = 8,
                   bar: Any = None) -> float:
    """Summed next-token NLL over ``seqs``, running the model one layer at a time.

    Sequences are sorted by length and right-padded per chunk, so plain causal attention (no mask)
    is exact for every real token. Each layer's FFN block runs once over all real tokens (in the
    order of ``seqs``) so a checkpoint-backed MoE reads its experts once per layer.
    """
    m = model.model
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    groups = [order[s:s + chunk] for s in range(0, len(order), chunk)]
    ids, hs, rope, masks = [], [], [], []
    for g in groups:
        t = max(len(seqs[i]) for i in g)
        ids.append(torch.tensor([seqs[i] + [0] * (t - len(seqs[i])) for i in g]))  # [b, t]
        masks.append(torch.tensor([[p < len(seqs[i]) for p in range(t)] for i in g]))  # [b, t]
        hs.append(m.embed_tokens(ids[-1]))  # [b, t, H]
        rope.append(m.rotary_emb(hs[-1], torch.arange(t)[None].expand(len(g), -1)))
    # flat token order: the order of ``seqs``, so routes line up with the callers' lengths
    flat_pos = torch.cat([torch.tensor([len(seqs[i]) for i in g]) for g in groups])
    perm = torch.tensor([i for g in groups for i in g])
    starts = torch.zeros(len(seqs), dtype=torch.long)
    starts[1:] = torch.tensor([len(s) for s in seqs]).cumsum(0)[:-1]
    gather = torch.cat([torch.arange(n) + starts[i] for i, n in zip(perm.tolist(), flat_pos.tolist())])
    for layer, mlp in zip(m.layers, mlps):
        for k, h in enumerate(hs):
            attn = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope[k],
                                   attention_mask=None)[0]
            hs[k] = h + attn
        x = torch.cat([h[mk] for h, mk in zip(hs, masks)])  # [N, H] in chunk order
        x_seq = torch.empty_like(x)
        x_seq[gather] = layer.post_attention_layernorm(x)  # -> order of ``seqs``
        y = mlp(x_seq)[gather]  # [N, H] back in chunk order
        if bar is not None:
            bar.update(1)
        off = 0
        for k, mk in enumerate(masks):
            n = int(mk.sum())
            hs[k][mk] = hs[k][mk] + y[off:off + n]
            off += n
    total = 0.0
    for h, i, mk in zip(hs, ids, masks):
        # one sequence at a time: a chunk's [b, t, V] fp32 logits were ~1 GB (the build's peak)
        for b in range(h.shape[0]):
            n = int(mk[b].sum())
            logits = model.lm_head(m.norm(h[b, :n - 1])).float()  # [n-1, V]
            total += float(torch.nn.functional.cross_entropy(logits, i[b, 1:n], reduction="sum"))
    return total


@torch.inference_mode()
def measure(dense_model: Any, tok: Any, moe_dir: str, texts: list[str],
            progress: bool = False) -> dict[str, Any]:
    """Dense and MoE perplexity plus routing statistics of ``moe_dir`` over ``texts``."""
    from convert.progress import progress as tqdm
    with open(os.path.join(moe_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    experts, top_k = int(cfg["num_local_experts"]), int(cfg["num_experts_per_tok"])
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    lengths = [len(x) for x in seqs]
    n = sum(lengths) - len(seqs)  # predicted tokens
    layers = dense_model.model.layers
    # ~40 s on 2 cores: one step per layer, dense pass then MoE pass
    with tqdm(total=2 * len(layers), desc="held-out measurement", unit="layer",
              disable=not progress) as bar:
        d_nll = _layerwise_nll(dense_model, seqs, [layer.mlp for layer in layers], bar=bar)
        files = checkpoint_files(moe_dir)
        blocks = [CheckpointMoE(files, i, experts, top_k) for i in range(len(layers))]
        m_nll = _layerwise_nll(dense_model, seqs, blocks, bar=bar)
    summary = routing_summary([b.routes for b in blocks], lengths, experts)
    summary.update({"tokens": sum(lengths), "dense_perplexity": round(math.exp(d_nll / n), 4),
                    "moe_perplexity": round(math.exp(m_nll / n), 4)})
    return summary
