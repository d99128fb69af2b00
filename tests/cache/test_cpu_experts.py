"""--cpu-experts (cache/cpu_experts.py): the cost model's choice, the host copy held while the CPU
computes, the kernel path of a host expert, and (CUDA) the offloading cache serving misses from
the CPU with the same weights."""
import pytest
import torch

from cache import policies
from cache.cpu_experts import CpuCost, bucket
from cache.host_tier import HostLRU
from cache.offload import OffloadedExpertProvider
from cache.provider import HostExpert
from cache.quant import ExpertFormat, ExpertWeights
from cache.slots import SlotPool
from configs import CacheConfig
from engine.kernels import expert_forward
from tests.cache.synth import write_experts

L, E, K, I, H = 3, 8, 2, 16, 24
EXPERT_BYTES = 3 * I * H * 4          # slots hold float32


def test_buckets_are_powers_of_two() -> None:
    assert [bucket(r) for r in (0, 1, 2, 3, 4, 5, 9, 16)] == [1, 1, 2, 4, 4, 8, 16, 16]


def test_cpu_chosen_only_while_measured_cheaper_than_the_copy() -> None:
    # a 100 MB expert over a 25 GB/s link: 4 ms to copy; the CPU takes 2 ms for one row
    c = CpuCost(expert_bytes=100_000_000, row_bytes=8192, link_bytes_per_s=25e9, cpu_seconds_one_row=2e-3)
    assert c.copy_seconds() == pytest.approx(4e-3)
    assert c.prefer_cpu(1)
    assert c.cpu_seconds(3) == pytest.approx(4 * 2e-3 + 2 * 3 * 8192 / 25e9)   # bucket 4, scaled
    assert not c.prefer_cpu(3)                 # unmeasured: pessimistic, so it copies
    c.observe(4, 3e-3)                         # measured once: 3 ms for a bucket-4 row count
    assert c.prefer_cpu(3) and c.prefer_cpu(4)
    assert not c.prefer_cpu(64)                # 3 ms x 16 from bucket 4
    c.observe(1, 6e-3)                         # running mean: 0.7 x 2 + 0.3 x 6 ms
    assert c.cpu[1] == pytest.approx(3.2e-3)


def test_a_held_host_copy_is_never_handed_to_another_expert() -> None:
    lru = HostLRU(SlotPool(2, ExpertFormat("none", I, H, torch.float32), torch.device("cpu")))
    a, b, c, d = (0, 1), (0, 2), (1, 3), (1, 4)
    for key in (a, b):
        slot, from_disk = lru.reserve(key)
        assert from_disk
        lru.release(key, keep=True)
    assert lru.hold((2, 0)) is None                 # no copy: nothing to compute from
    held = lru.hold(a)
    assert held is not None and lru.hold(a) is None   # held (busy): not held twice
    got = lru.reserve(c)                            # full: takes b's slot, never the held a's
    assert got is not None and got[0] != held and got[1]
    assert lru.reserve(d) is None                   # a held, c being loaded: no slot free
    lru.release(a, keep=True)
    lru.release(c, keep=True)
    assert lru.reserve(d) is not None and lru.hold(a) is None   # a was the least recent: gone


def test_a_host_expert_computes_on_the_cpu_and_reports_its_time() -> None:
    g = torch.Generator().manual_seed(0)
    w = ExpertWeights(torch.randn(I, H, generator=g), torch.randn(I, H, generator=g),
                      torch.randn(H, I, generator=g))
    x = torch.randn(3, H, generator=g)
    seen: list[tuple[int, float]] = []
    out = expert_forward(x, HostExpert(w, lambda rows, s: seen.append((rows, s))))
    assert torch.equal(out, expert_forward(x, w))
    assert len(seen) == 1 and seen[0][0] == 3 and seen[0][1] > 0


@pytest.mark.gpu
def test_cuda_misses_computed_on_the_cpu_use_the_checkpoint_weights(tmp_path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sources, want = write_experts(str(tmp_path), L, E, I, H, dtype=torch.bfloat16, shards=2)
    p = OffloadedExpertProvider(sources, torch.device("cuda"), torch.float32,
                                CacheConfig(expert_budget=str(K * EXPERT_BYTES), cpu_experts="auto"),
                                policies.make_policy("lru", L, E, K, None), cpu_compute=expert_forward)
    try:
        assert p._cpu is not None
        # a link at 1 byte/s: every miss with a host copy is cheaper on the CPU
        p._cpu.cost = CpuCost(EXPERT_BYTES, H * 4, 1.0, 1e-6)
        g = torch.Generator().manual_seed(5)
        on_cpu = 0
        for _ in range(8):
            for layer in range(L):
                ids = torch.stack([torch.randperm(E, generator=g)[:K]])      # one decode row
                x = torch.randn(1, H, device="cuda")
                for e, w in p.experts(layer, ids.cuda()):
                    if isinstance(w, HostExpert):
                        on_cpu += 1
                        flat = torch.cat([t.reshape(-1) for t in w.weights])
                        assert flat.device.type == "cpu"
                        assert torch.equal(flat, want[(layer, e)].float())
                        assert expert_forward(x, w).device.type == "cuda"
                    else:
                        flat = torch.cat([t.reshape(-1) for t in w]).cpu()
                        assert torch.equal(flat, want[(layer, e)].float())
        s = p.stats()
        assert on_cpu == s["cpu_computed"] > 0
        assert s["hits"] + s["misses"] == s["accesses"]
    finally:
        p.close()
