"""cache/quant.py, cache/packed.py and engine/kernels.py: round trips within each format's error
bound, kernels against a dequantized fp32 reference, the CPU int4 layout unpacked exactly,
prepacked bf16 weights bit-identical to plain ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cache.quant import ExpertFormat, default_group_size, fill_slot, pack_int4, unpack_int4_cpu
from cache.quantizers import dequantize_int4, quantize_int4, quantize_int8
from cache.packed import PackedExpert, pack_expert, packs
from engine.kernels import PackedLinear, dequantize, expert_forward, linear, pack_linears


def _weights(o: int, i: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, generator=g) * 0.05
    w[0, :5] = torch.tensor([0.4, -0.3, 0.0, 1e-6, -1e-6])      # outliers and near-zeros
    return w


def test_int8_round_trip_within_half_a_step() -> None:
    w = _weights(96, 64)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (96,)
    err = (q.float() * s.float()[:, None] - w).abs()
    assert (err <= s.float()[:, None] * 0.5 + 1e-7).all()       # rounding: at most half a step
    assert torch.equal(q.abs().amax(1), torch.full((96,), 127, dtype=torch.int8))


@pytest.mark.parametrize("group", [32, 64])
def test_int4_round_trip_beats_min_max_rounding(group: int) -> None:
    w = _weights(64, 128)
    q, sz = quantize_int4(w, group)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (128 // group, 64, 2)
    back = dequantize_int4(q, sz, group)
    # plain min/max round-to-nearest: every weight within half a step
    g = w.view(64, -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    rtn = (torch.round((g - lo) / step).clamp(0, 15) * step + lo).view(64, 128)
    assert ((rtn - w).abs() <= step.repeat_interleave(group, -1).view(64, 128) * 0.5 + 1e-6).all()
    # the clip search + least-squares refit has no larger squared error in any group (bf16
    # storage of scale and zero aside), and clips at most 10% of a group's range per end
    err = (back - w).pow(2).view(64, -1, group).sum(-1)
    assert (err <= (rtn - w).pow(2).view(64, -1, group).sum(-1) * 1.02 + 1e-7).all()
    assert err.sum() < (rtn - w).pow(2).sum()
    assert ((back - w).abs().view(64, -1, group) <= (hi - lo) * 0.1 + step).all()


def _on_a_4_bit_grid(kind: str, o: int, i: int) -> torch.Tensor:
    """Weights as a 4-bit GGUF holds them: gguf-py's Q4_0 or Q4_1 of scaled noise, or Q4_K's
    d * sc * q - dmin * m per sub-block of 32 (fp16 d, dmin; 6-bit sc, m), dequantized."""
    gen = torch.Generator().manual_seed(5)
    if kind == "Q4_K":
        d, dmin = (torch.rand(o, i // 256, 1, 1, generator=gen).half().float() * 1e-3 for _ in range(2))
        sc, m = (torch.randint(0, 64, (o, i // 256, 8, 1), generator=gen).float() for _ in range(2))
        q = torch.randint(0, 16, (o, i // 256, 8, 32), generator=gen).float()
        return (d * sc * q - dmin * m).reshape(o, i)
    gguf = pytest.importorskip("gguf")
    scales = torch.randn(o, i // 32, 1, generator=gen).mul(0.5).exp()
    w = (torch.randn(o, i // 32, 32, generator=gen) * scales).reshape(o, i).numpy()
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).copy())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K", "float"])
def test_weights_on_a_4_bit_grid_skip_the_search_and_lose_nothing(kind: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-bit GGUF's experts lie on each group's 16-level grid: the clipped-range search is
    skipped (2 candidates instead of 5), with no more total error than the search gives; other
    weights take the whole search, as before."""
    import cache.quantizers as quant
    w = _weights(256, 512) if kind == "float" else _on_a_4_bit_grid(kind, 256, 512)
    codes = quant._int4_codes
    calls = []
    monkeypatch.setattr(quant, "_int4_codes", lambda *a: calls.append(1) or codes(*a))
    fast = quantize_int4(w, 32)
    assert len(calls) == (9 if kind == "float" else 2)
    monkeypatch.setattr(quant, "_on_grid", lambda *a: False)
    full = quantize_int4(w, 32)

    def err(q: torch.Tensor, sz: torch.Tensor) -> float:
        return float((dequantize_int4(q, sz, 32) - w).pow(2).sum())
    if kind == "float":
        assert torch.equal(fast[0], full[0]) and torch.equal(fast[1], full[1])
    else:
        assert err(*fast) <= err(*full) * 1.001
        assert float((fast[0] == full[0]).float().mean()) > 0.99
        assert err(*fast) < 1e-4 * float(w.pow(2).sum())       # the file's codes, up to bf16 scales


def test_cpu_int4_layout_unpacks_exactly() -> None:
    q = torch.randint(0, 16, (96, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(unpack_int4_cpu(pack_int4(q, "cpu"), 96, 64), q)


def test_default_group_size_is_largest_divisor() -> None:
    assert default_group_size(576) == 64 and default_group_size(1536) == 128
    assert default_group_size(96) == 32
    with pytest.raises(ValueError, match="divisible by 32"):
        default_group_size(100)


def test_bad_formats_name_the_field() -> None:
    with pytest.raises(ValueError, match="group_size=48"):
        ExpertFormat("int4", 64, 64, group_size=48)
    with pytest.raises(ValueError, match="group_size=128"):
        ExpertFormat("int4", 64, 96, group_size=128)            # 96 is not a multiple of 128
    with pytest.raises(ValueError, match="quantize='int3'"):
        ExpertFormat("int3", 64, 64)


@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 5])
def test_kernels_match_dequantized_reference(kind: str, group: int, rows: int) -> None:
    inter, hidden = 128, 64
    fmt = ExpertFormat(kind, inter, hidden, group_size=group)
    ws = {"gate": _weights(inter, hidden, 1), "up": _weights(inter, hidden, 2),
          "down": _weights(hidden, inter, 3)}
    buf = torch.empty(fmt.slot_bytes, dtype=torch.uint8)
    fill_slot(fmt, buf, ws)
    views = fmt.views(buf)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(9))
    for name in ("gate", "up"):
        ref_w = dequantize(getattr(views, name))                # fp32 [O, In] from the slot bytes
        # the dequantized weight is close to the original (format error bound) ...
        top = ws[name].abs().amax()
        bound = 0.5 / 127 * top if kind == "int8" else 2 * top * 0.1 + 2 * top / 15
        assert (ref_w - ws[name]).abs().max() <= bound * 1.1
        # ... and the kernel computes x @ that weight, up to bf16 activations and accumulation
        got = linear(x, getattr(views, name))
        want = x.to(torch.bfloat16).float() @ ref_w.t()
        assert got.dtype == x.dtype and got.shape == (rows, inter)
        assert (got - want).abs().max() <= 0.02 * want.abs().max() + 1e-3
    # the whole SwiGLU expert against fp32 on the dequantized weights
    ref = F.linear(F.silu(F.linear(x, dequantize(views.gate))) * F.linear(x, dequantize(views.up)),
                   dequantize(views.down))
    got = expert_forward(x, views)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max() + 1e-3


def test_plain_slot_views_compute_like_f_linear() -> None:
    fmt = ExpertFormat("none", 32, 64, torch.float32)
    buf = torch.empty(fmt.slot_bytes, dtype=torch.uint8)
    ws = {"gate": _weights(32, 64, 1), "up": _weights(32, 64, 2), "down": _weights(64, 32, 3)}
    fill_slot(fmt, buf, ws)
    x = torch.randn(3, 64)
    want = F.linear(F.silu(F.linear(x, ws["gate"])) * F.linear(x, ws["up"]), ws["down"])
    assert torch.equal(expert_forward(x, fmt.views(buf)), want)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,made", [("int8", "cpu"), ("int4", "repacked"), ("int4", "on the gpu")])
def test_cuda_kernels_match_the_cpu_store(kind: str, made: str) -> None:
    """A CPU-layout slot re-packed once for CUDA, or a CUDA slot quantized on the GPU (as a
    conversion for CUDA does), computes what the CPU kernel computes."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from cache.quant import repack_slot
    inter, hidden = 256, 128
    cpu_fmt = ExpertFormat(kind, inter, hidden, group_size=64 if kind == "int4" else 0)
    ws = {"gate": _weights(inter, hidden, 1), "up": _weights(inter, hidden, 2),
          "down": _weights(hidden, inter, 3)}
    buf = torch.empty(cpu_fmt.slot_bytes, dtype=torch.uint8)
    fill_slot(cpu_fmt, buf, ws)
    if kind == "int4":
        cuda_fmt = ExpertFormat(kind, inter, hidden, group_size=64, layout="cuda")
        cbuf = torch.empty(cuda_fmt.slot_bytes, dtype=torch.uint8)
        if made == "repacked":
            repack_slot(cpu_fmt, cuda_fmt, buf, cbuf)
        else:
            fill_slot(cuda_fmt, cbuf, ws)
    else:
        cuda_fmt, cbuf = cpu_fmt, buf
    x = torch.randn(4, hidden, dtype=torch.bfloat16)
    want = expert_forward(x, cpu_fmt.views(buf)).float()
    got = expert_forward(x.cuda(), cuda_fmt.views(cbuf.cuda())).float().cpu()
    assert (got - want).abs().max() <= 0.02 * want.abs().max() + 1e-3


needs_onednn_bf16 = pytest.mark.skipif(not packs(torch.device("cpu"), torch.bfloat16),
                                       reason="no oneDNN bf16 on this CPU")


@needs_onednn_bf16
@pytest.mark.parametrize("inter,hidden", [(32, 64), (96, 64), (1536, 576)])
def test_packed_resident_expert_is_bit_identical_to_a_plain_slot(inter: int, hidden: int) -> None:
    """Resident bf16 experts are prepacked (gate and up stacked), cache slots stay plain: both
    must give the same bits at every row count, or offloaded output would drift from resident."""
    fmt = ExpertFormat("none", inter, hidden, torch.bfloat16)
    buf = torch.empty(fmt.slot_bytes, dtype=torch.uint8)
    plain = fmt.views(buf)
    for n, w in enumerate(plain):
        w.copy_(_weights(*w.shape, seed=n).to(torch.bfloat16))
    packed = pack_expert(plain)
    assert isinstance(packed, PackedExpert) and packed.gate_up.is_mkldnn
    g = torch.Generator().manual_seed(inter)
    for rows in (1, 2, 3, 8, 33):
        # several inputs per row count: a kernel mismatch may show only on some (oneDNN's one-row
        # plain product against a padded packed one differed for ~1 input in 10 at In = 1536)
        for _ in range(24 if rows == 1 else 4):
            x = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
            assert torch.equal(expert_forward(x, packed), expert_forward(x, plain)), rows
        ref = F.linear(F.silu(F.linear(x.float(), plain.gate.float())) * F.linear(x.float(), plain.up.float()),
                       plain.down.float())
        assert (expert_forward(x, packed).float() - ref).abs().max() <= 0.05 * ref.abs().max()


@needs_onednn_bf16
def test_pack_linears_keeps_outputs_and_routers_plain() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8, bias=False)).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        router = model[1].weight
        assert pack_linears(model, keep_plain=[router]) == 2
        assert isinstance(model[0], PackedLinear) and model[0].weight.is_mkldnn
        assert model[1].weight is router                   # still readable as a plain tensor
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("heads,kv_heads,dk,dv,keys", [(9, 3, 64, 64, 1), (9, 3, 64, 64, 700),
                                                       (4, 4, 48, 32, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa(heads: int, kv_heads: int, dk: int, dv: int, keys: int,
                                       dtype: torch.dtype) -> None:
    from engine.models.common import decode_attention
    g = torch.Generator().manual_seed(keys)
    q = torch.randn(1, heads, 1, dk, generator=g)
    k, v = torch.randn(1, kv_heads, keys, dk, generator=g), torch.randn(1, kv_heads, keys, dv, generator=g)
    for scale in (None, 0.3):
        ref = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=heads != kv_heads)
        out = decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale)
        assert out.shape == (1, heads, 1, dv) and out.dtype == dtype
        # fp32: the same sums in another order; bf16: inputs and output rounded (8 bits)
        torch.testing.assert_close(out.float(), ref, atol=1e-5 if dtype == torch.float32 else 2e-2,
                                   rtol=1e-4 if dtype == torch.float32 else 2e-2)


def test_quant_linear_is_the_int4_product_of_its_weight() -> None:
    from engine.kernels import QuantLinear
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g))
    ql = QuantLinear(lin)
    w = dequantize(ql.weight)                                    # [48, 64] fp32
    # int4 in groups of 64 (16 levels over a clipped range): about 1/10 of the weights' size
    err = (w - lin.weight.float()).norm() / lin.weight.float().norm()
    assert 0 < err < 0.15
    x = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16)   # any leading dims
    got = ql(x)
    assert got.shape == (2, 3, 48) and got.dtype == torch.bfloat16
    want = F.linear(x.float(), w, lin.bias.float())
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()


def test_quantize_linears_keeps_routers_and_shapes_the_int4_packs_cannot_take() -> None:
    from engine.kernels import QuantLinear, quantize_linears
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Linear(48, 16), torch.nn.Linear(64, 64),
                                torch.nn.Linear(64, 1))
    assert quantize_linears(model, keep=[model[0].weight]) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "Linear", "QuantLinear", "Linear"]
    assert isinstance(model[2], QuantLinear)
