"""cache/slots.py: slot pools hold exactly what the budget pays for, allocated once."""
from __future__ import annotations

import pytest
import torch

from cache.quant import ExpertFormat
from cache.slots import ALIGN, BudgetError, SlotPool, auto_host_budget, pinned_plan, slot_count


@pytest.mark.parametrize("budget", [3 * 4096, 3 * 4096 + 4095, 10 * 4096 + 1])
def test_pool_never_exceeds_budget(budget: int) -> None:
    inter, hidden, dtype = 16, 32, torch.bfloat16
    expert_bytes = 3 * inter * hidden * 2
    n = slot_count(budget, expert_bytes, minimum=2, field="expert_budget")
    pool = SlotPool(n, ExpertFormat("none", inter, hidden, dtype), torch.device("cpu"))
    assert pool.allocated_bytes <= budget
    assert pool.allocated_bytes == n * expert_bytes
    assert budget - pool.allocated_bytes < expert_bytes       # no slot left unpaid for
    storage = pool.buffer(0).untyped_storage()
    taken = [pool.acquire() for _ in range(n)]
    assert sorted(taken) == list(range(n)) and pool.acquire() is None
    for s in taken:                                           # every slot lives in that one block
        buf = pool.buffer(s)
        assert buf.untyped_storage().data_ptr() == storage.data_ptr()
        assert buf.is_contiguous() and buf.numel() == expert_bytes
        w = pool.views(s)
        assert w.gate.shape == (inter, hidden) and w.up.shape == (inter, hidden)
        assert w.down.shape == (hidden, inter)
        assert w.gate.data_ptr() == buf.data_ptr()


def test_views_alias_the_slot() -> None:
    pool = SlotPool(2, ExpertFormat("none", 2, 3, torch.float32), torch.device("cpu"))
    s = pool.acquire()
    pool.buffer(s).view(torch.float32).copy_(torch.arange(18, dtype=torch.float32))
    w = pool.views(s)
    assert w.gate.flatten().tolist() == list(range(6))
    assert w.up.flatten().tolist() == list(range(6, 12))
    assert w.down.flatten().tolist() == list(range(12, 18))


def test_release_checks() -> None:
    pool = SlotPool(2, ExpertFormat("none", 2, 2, torch.float32), torch.device("cpu"))
    s = pool.acquire()
    pool.release(s)
    with pytest.raises(ValueError, match="not an acquired slot"):
        pool.release(s)
    with pytest.raises(ValueError, match="not an acquired slot"):
        pool.release(7)


def test_budget_below_top_k_names_field_value_and_minimum() -> None:
    with pytest.raises(BudgetError, match=r"expert_budget=700 bytes holds 0 experts.*at least 2.*"
                                          r"expert_budget >= 1536 bytes"):
        slot_count(700, 768, minimum=2, field="expert_budget")


@pytest.mark.gpu
def test_host_pool_is_pinned() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fmt = ExpertFormat("int4", 64, 64, group_size=64)
    pool = SlotPool(2, fmt, torch.device("cpu"), pin=True,
                    chunks=pinned_plan(10 * fmt.slot_bytes, fmt.slot_bytes, 5))
    assert pool.is_pinned() and pool.num_slots == 5
    assert pool.allocated_bytes <= 10 * fmt.slot_bytes


@pytest.mark.parametrize("kind,group", [("int8", 0), ("int4", 32), ("int4", 64)])
def test_quantized_slots_are_aligned_and_sized_by_format(kind: str, group: int) -> None:
    fmt = ExpertFormat(kind, 128, 64, group_size=group)
    pool = SlotPool(3, fmt, torch.device("cpu"))
    assert fmt.slot_bytes % ALIGN == 0 and pool.allocated_bytes == 3 * fmt.slot_bytes
    raw = 3 * 128 * 64 * (1 if kind == "int8" else 0.5)     # weight bytes alone
    assert raw < fmt.slot_bytes < raw + ALIGN + 3 * 128 * 8  # + scales, padding only to 4 KiB
    for s in range(3):
        buf = pool.buffer(s)
        assert buf.data_ptr() % ALIGN == 0                   # an O_DIRECT read lands in place
        w = pool.views(s)
        assert w.gate.kind == kind and w.gate.shape == (128, 64) and w.down.shape == (64, 128)
        segs = [w.gate.q, w.gate.scales, w.up.q, w.up.scales, w.down.q, w.down.scales]
        ptrs = [t.data_ptr() - buf.data_ptr() for t in segs]
        assert ptrs == sorted(ptrs) and all(0 <= p < fmt.slot_bytes for p in ptrs)


def test_host_lru_reuses_copies_and_never_hands_out_a_busy_slot():
    import torch
    from cache.host_tier import HostLRU
    from cache.quant import ExpertFormat
    from cache.slots import SlotPool
    lru = HostLRU(SlotPool(2, ExpertFormat("none", 2, 2, torch.float32), torch.device("cpu")))
    sa, disk = lru.reserve((0, 0))
    assert disk
    sb, _ = lru.reserve((0, 1))
    assert not lru.can_reserve((0, 2)) and lru.can_reserve((0, 1))
    assert lru.reserve((0, 2)) is None                 # both copies are in use by loads
    lru.release((0, 0), keep=True)
    assert lru.can_reserve((0, 2))                     # (0, 0)'s copy is free to reuse
    lru.release((0, 1), keep=True)
    assert lru.reserve((0, 1)) == (sb, False)          # a host hit: no disk read
    lru.release((0, 1), keep=True)
    assert lru.reserve((0, 2)) == (sa, True)           # evicts the least recently used copy
    lru.release((0, 2), keep=False)                    # its read failed: the copy is dropped
    assert len(lru) == 1 and lru.reserve((0, 2))[1]


def test_host_lru_order_follows_device_use_and_eviction():
    import torch
    from cache.host_tier import HostLRU
    from cache.quant import ExpertFormat
    from cache.slots import SlotPool
    lru = HostLRU(SlotPool(3, ExpertFormat("none", 2, 2, torch.float32), torch.device("cpu")))
    slots = {}
    for key in [(0, 0), (0, 1), (0, 2)]:
        slots[key], _ = lru.reserve(key)
        lru.release(key, keep=True)
    lru.touch((0, 0))                   # a device hit on the oldest copy
    lru.touch((1, 5))                   # no host copy: nothing to do
    assert lru.reserve((0, 3)) == (slots[(0, 1)], True)     # (0, 1) is now the least recent
    lru.release((0, 3), keep=True)
    lru.touch((0, 2))                   # evicted from the device: the next to come back
    assert lru.reserve((0, 4)) == (slots[(0, 0)], True)
    assert lru.reserve((0, 2)) == (slots[(0, 2)], False)     # its copy stayed


def test_busy_time_is_the_union_of_overlapping_copies() -> None:
    import random
    from cache.host_tier import BusyTime
    b = BusyTime(keep=4)
    for span in [(0.0, 1.0), (0.5, 1.5), (3.0, 4.0), (2.0, 2.5), (1.4, 2.1), (9.0, 9.0)]:
        b.add(*span)                                # out of order, overlapping, one empty
    assert b.seconds == pytest.approx(3.5)          # [0, 2.5) and [3, 4)
    # many spans, a few out of order: the same as a union computed on a fine grid
    rng = random.Random(3)
    spans = sorted((t, t + rng.uniform(0.1, 2.0)) for t in (rng.uniform(0, 300) for _ in range(200)))
    for i in range(0, len(spans) - 1, 5):           # swap neighbours: arrivals slightly out of order
        spans[i], spans[i + 1] = spans[i + 1], spans[i]
    b = BusyTime(keep=8)
    for span in spans:
        b.add(*span)
    grid = [t / 100 for t in range(31000)]
    covered = sum(any(s <= t < e for s, e in spans) for t in grid) / 100
    assert b.seconds == pytest.approx(covered, abs=0.05)


@pytest.mark.parametrize("budget,slot,need", [
    (10 * 2**30, 352_321_536, 256),          # Mixtral-8x7B bf16 experts, a 10 GiB host budget
    (90 * 2**30, 352_321_536, 256),          # more than all 256 experts: only what they need
    (2**20, 3000, 1000), (12_345_678, 4096, 10_000), (4096, 4096, 1), (8191, 4096, 7),
    # budgets of exactly every slot's bytes ('all'): each slot is held, up to a slot per chunk over
    (256 * 352_321_536, 352_321_536, 256), (512 * 5_308_416, 5_308_416, 512), (16 * 4608, 4608, 16),
    (3 * 4608, 4608, 3)])
def test_pinned_plan_never_pins_more_than_the_budget(budget: int, slot: int, need: int) -> None:
    plan = pinned_plan(budget, slot, need)
    assert all(b & (b - 1) == 0 for b, _ in plan)     # powers of two: nothing rounded up
    assert all(0 <= b - n * slot < slot for b, n in plan)   # each chunk wastes under one slot
    slots = sum(n for _, n in plan)
    assert slots <= need
    if budget >= need * slot:
        assert slots == need and sum(b for b, _ in plan) < need * slot + len(plan) * slot
        return
    assert sum(b for b, _ in plan) <= budget
    one = 1 << (slot - 1).bit_length()
    if slots < need:   # it stopped for the budget: what is left cannot pay for another slot
        assert budget - sum(b for b, _ in plan) < one


def test_pinned_plan_uses_most_of_a_large_budget() -> None:
    slot = 352_321_536                                   # Mixtral expert, bf16
    plan = pinned_plan(60 * 2**30, slot, 256)
    slots = sum(n for _, n in plan)
    assert slots * slot >= 0.95 * 60 * 2**30 - slot     # a single 60 GiB request would pin 64


def test_chunked_pool_slots_are_disjoint_and_in_their_chunks() -> None:
    fmt = ExpertFormat("none", 16, 32, torch.bfloat16)
    plan = pinned_plan(7 * fmt.slot_bytes, fmt.slot_bytes, 9)
    pool = SlotPool(0, fmt, torch.device("cpu"), chunks=plan)
    assert pool.num_slots == sum(n for _, n in plan) and len(plan) > 1
    assert pool.allocated_bytes == sum(b for b, _ in plan) <= 7 * fmt.slot_bytes
    spans = sorted((pool.buffer(s).data_ptr(), pool.buffer(s).numel()) for s in range(pool.num_slots))
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))   # no two overlap
    for s in range(pool.num_slots):
        pool.buffer(s).fill_(s)
    assert all(int(pool.buffer(s).float().mean()) == s for s in range(pool.num_slots))


def test_auto_host_budget_leaves_the_os_its_share() -> None:
    GiB = 2**30
    assert auto_host_budget(90 * GiB, 120 * GiB, 128 * GiB) == 90 * GiB   # everything fits
    assert auto_host_budget(90 * GiB, 60 * GiB, 64 * GiB) == 60 * GiB - int(6.4 * GiB)
    assert auto_host_budget(90 * GiB, 8 * GiB, 16 * GiB) == 4 * GiB      # at least 4 GiB kept
    assert auto_host_budget(90 * GiB, 3 * GiB, 8 * GiB) == 0
