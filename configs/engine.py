"""Engine configuration: which model, on which device, how many requests at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from configs.base import ConfigError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANT_FORMATS = ("none", "int8", "int4")   # routed-expert storage formats (cache/quant.py)
GROUP_SIZES = (32, 64, 128)
DENSE_QUANT = ("off", "int4")              # formats of the dense linear layers (engine/kernels.py)


@dataclass(frozen=True)
class EngineConfig:
    """Engine: model, device, dtype, batching and context."""

    model: Optional[str] = field(default=None, metadata={
        "help": "checkpoint directory (config.json + safetensors + tokenizer), the org/name "
                "of a Hugging Face repo in the local Hugging Face cache (never downloaded), a GGUF "
                "file, or the name:tag of a model Ollama has pulled (GGUFs are converted once); "
                "omitted: the built-in default model, built on first use", "metavar": "MODEL"})
    default_preset: str = field(default="smollm2-moe-8x", metadata={
        "help": "built-in default model preset used when --model is omitted",
        "choices": ("smollm2-moe-8x", "smollm2-moe-64x")})
    device: str = field(default="auto", metadata={
        "help": "compute device: auto picks cuda when available, else cpu", "choices": DEVICES})
    dtype: str = field(default="auto", metadata={
        "help": "compute dtype; auto: bf16 for int8/int4 experts (their kernels take bf16 "
                "activations), else the checkpoint's dtype (fp32 on a CPU without native bf16; on "
                "the bf16 default model bf16 decoded 9-20% faster than fp32 here, at half the memory)",
        "choices": DTYPES})
    quantize: Optional[str] = field(default=None, metadata={
        "help": "routed-expert format: int8 (per-channel) or int4 (group-wise) converts an "
                "unquantized checkpoint once into MOESERVE_HOME and serves that; none serves it "
                "as it is; omitted: the checkpoint's own format (FP8 and gpt-oss MXFP4 "
                "checkpoints: int8; gpt-oss's stacked bf16 experts: converted once per expert, "
                "unquantized; GGUF experts of at most 5 bits per weight on average: int4 in "
                "groups of 32, more bits and MXFP4: int8, F16/BF16/F32: none)", "choices": QUANT_FORMATS})
    group_size: Optional[int] = field(default=None, metadata={
        "help": "int4 group size (32, 64 or 128); default: the largest that divides every "
                "expert input dimension"})
    dense_quantize: str = field(default="off", metadata={
        "help": "int4: the dense linear layers in int4 too, quantized at load in groups of 32 "
                "(attention, shared experts; not the routers, nor the LM head, which llama.cpp's "
                "Q4_K_M also keeps at more bits). Default model, int4 experts, CPU: decoding 1.2x "
                "faster at batch 1, the same at batch 8, perplexity unchanged (README)",
        "choices": DENSE_QUANT})
    max_batch: int = field(default=8, metadata={
        "help": "most requests decoded together in one step (continuous batching)"})
    prefill_chunk: int = field(default=256, metadata={
        "help": "most prompt tokens in one prompt pass: longer prompts are processed in chunks, "
                "each followed by a decode step of the running requests, so their streams keep "
                "flowing while a long prompt is read"})
    prefix_cache: bool = field(default=True, metadata={
        "help": "keep each finished request's keys and values in its slot, and read only the part "
                "of a new prompt after the longest prefix a free slot holds (a chat turn re-sends "
                "the whole conversation); --no-prefix-cache computes every prompt whole, so a "
                "request's tokens never depend on what ran before it"})
    context_length: Optional[int] = field(default=None, metadata={
        "help": "tokens per request (prompt + output); default: the model's, capped at 4096"})
    threads: Optional[int] = field(default=None, metadata={
        "help": "CPU threads for compute (torch.set_num_threads); default: torch's choice (the "
                "physical cores), waiting passively between ops (OMP_WAIT_POLICY=PASSIVE unless "
                "set: spinning threads were 3-5x slower on a busy machine)"})

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError("device", self.device, f"choose one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"choose one of {', '.join(DTYPES)}")
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError("max_batch", self.max_batch, "must be between 1 and 1024")
        if not 16 <= self.prefill_chunk <= 65536:
            raise ConfigError("prefill_chunk", self.prefill_chunk, "must be between 16 and 65536")
        if self.context_length is not None and self.context_length < 16:
            raise ConfigError("context_length", self.context_length, "must be at least 16")
        if self.quantize is not None and self.quantize not in QUANT_FORMATS:
            raise ConfigError("quantize", self.quantize, f"choose one of {', '.join(QUANT_FORMATS)}")
        if self.group_size is not None:
            if self.group_size not in GROUP_SIZES:
                raise ConfigError("group_size", self.group_size,
                                  f"choose one of {', '.join(map(str, GROUP_SIZES))}")
            if self.quantize != "int4":
                raise ConfigError("group_size", self.group_size, "applies to --quantize int4 only")
        if self.dense_quantize not in DENSE_QUANT:
            raise ConfigError("dense_quantize", self.dense_quantize,
                              f"choose one of {', '.join(DENSE_QUANT)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", self.threads, "must be at least 1")
