"""What the GGUF tests share: each family's tiny-checkpoint settings as its GGUFs are released, the
prompt, and the logits a converted checkpoint gives (all experts resident)."""
from __future__ import annotations

import torch

from cache.provider import ResidentExpertProvider
from engine.loader import load_model
from engine.models.common import Batch, KVCache

CPU = torch.device("cpu")
VOCAB = 49152                   # the SmolLM2 tokenizer's, which the tiny GGUFs carry
# all layers MoE, as llama.cpp's qwen2moe/qwen3moe graphs have them
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
ALL_MOE = {"mlp_only_layers": []}
# llama with q/k/v biases: llama.cpp permutes the q/k biases with the weights
# gpt-oss: the SwiGLU limit every gpt-oss GGUF has (llama.cpp does not store it)
FAMILIES = {"mixtral": {}, "qwen2_moe": ALL_MOE, "qwen3_moe": ALL_MOE, "olmoe": {}, "llama": {"attention_bias": True},
            "gpt_oss": {"swiglu_limit": 7.0},
            # GLM-4.5: one expert group, as released (llama.cpp's GLM graph has none)
            "glm4_moe": {"n_group": 1, "topk_group": 1},
            # DeepSeek: mscale == mscale_all_dim, as every release has it (a GGUF carries only the latter)
            "deepseek_v2": {}, "deepseek_v2_grouped": {}, "qwen3_next": ALL_MOE, "qwen3_5_moe_text": {},
            # ERNIE-4.5 as released: no biases (llama.cpp's graph has no LM head bias)
            "ernie4_5_moe": {"use_bias": False}, "minimax_m2": {},
            "deepseek_v3": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                "original_max_position_embeddings": 32, "mscale": 0.8,
                                                "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}}}
PROMPT = (1, 17, 402, 9, 2211, 88, 3016, 5, 44)


def logits(model_dir: str) -> torch.Tensor:
    """Prompt logits [T, V] of the model in ``model_dir``, fp32, all experts resident."""
    loaded = load_model(model_dir, CPU, torch.float32, context_length=32)
    kv = KVCache.for_model(loaded.model.kv_spec, 1, 32, torch.float32, CPU)
    batch = Batch(torch.arange(len(PROMPT))[None], torch.tensor([0]), len(PROMPT), single_slot=0)
    loaded.model.set_provider(ResidentExpertProvider(loaded.experts, CPU, torch.float32))
    with torch.inference_mode():
        return loaded.model(torch.tensor([PROMPT]), batch, kv, all_logits=True)[0]
