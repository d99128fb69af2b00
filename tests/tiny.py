"""Tiny random checkpoints written with transformers' own config classes and save_pretrained."""
from __future__ import annotations

import os

import torch


def make_tiny_mixtral(path: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                      experts: int = 4, layers: int = 2, vocab: int = 128) -> str:
    """A 2-layer, 4-expert Mixtral with routers scaled up so routing is decisive."""
    from transformers import MixtralConfig, MixtralForCausalLM
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=2, max_position_embeddings=256, eos_token_id=2,
                        bos_token_id=1, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20.0)
    model.to(dtype).save_pretrained(path)
    return path
