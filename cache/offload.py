"""The offloading expert cache: a byte budget of expert slots filled from disk in the background.

Tiers: on CPU, disk -> RAM slots (the "device" tier is RAM). On CUDA, disk -> pinned host slots ->
device slots; host->device copies run on streams of their own (demand loads on a high-priority
one), and compute waits only for the expert it is about to use.

Threading: every policy call and every piece of bookkeeping runs on the engine thread (the one
calling ``experts``). I/O threads only fill the slot buffers a ``LoadJob`` names and report back.
An expert is pinned (never evicted) while a load into it is in flight and, for the layer being
computed, until the layer has consumed it.

Prefetch (disk tier included): at each layer the demand loads go first, then the policy's
guesses for the next layers (the next router's look-ahead among them), as many as the link can
deliver in two layer steps (cache/prefetch_pacer.py, rates measured online). A guess never
evicts the current layer's experts or the next layer's look-ahead; one that has not started
when its layer routes elsewhere is withdrawn.
"""
from __future__ import annotations

import queue
import time
from collections import Counter
from typing import Callable, Collection, Iterator, Optional, Sequence

import torch

from cache.cache_stats import CacheStats
from cache.cpu_experts import CpuExperts
from cache.disk import ExpertReader, ExpertReadError
from cache.host_tier import HostTier, resolve_host_budget
from cache.io_pool import IOPool, LoadJob
from cache.offload_report import OffloadReporting
from cache.policy import CachePolicy, ExpertKey, UnionKeys, ranked_hint_ids
from cache.prefetch_pacer import PrefetchPacer
from cache.provider import (ExpertProvider, ExpertSource, HostExpert, ProvidedExpert, Router, StepRows,
                            Tracer, check_shapes, expert_format)
from cache.quant import ExpertWeights
from cache.routing import Routed, split_routing
from cache.slots import SlotPool, pinned_plan, slot_count
from cache.step_events import MISS, PREFETCHED, StepEvents
from cache.store import CollectionStore
from configs.cache import CacheConfig


# the least likely guess worth a disk read. On the 64x model at 25% (2-core VM, busy), with the
# aligned checkpoint (experts read straight into slots): 0.7 read 1.17x the disk bytes of no
# prefetch for a 1.08x speedup, 0.8 read 1.09x for 1.24x (bench/results/prefetch.json: the run at 0.8)
DISK_MIN_Q = 0.8


class OffloadedExpertProvider(OffloadReporting, ExpertProvider):
    """Keeps ``cache_cfg.expert_budget`` bytes of experts resident; loads the rest on demand and
    prefetches what ``policy`` predicts, evicting ``policy.victim``s."""

    def __init__(self, sources: Sequence[ExpertSource], device: torch.device, dtype: torch.dtype,
                 cache_cfg: CacheConfig, policy: CachePolicy, tracer: Optional[Tracer] = None,
                 routers: Optional[Sequence[Router]] = None,
                 direct_io: Optional[bool] = None, store: Optional[CollectionStore] = None,
                 cpu_compute: Optional[Callable[[torch.Tensor, ExpertWeights], torch.Tensor]] = None
                 ) -> None:
        """routers: per MoE layer its router (cache/provider.Router), for next-layer look-ahead hints.
        direct_io: None uses O_DIRECT where the file system allows, False never, True always.
        store: persists the policy's collection of past activation matrices.
        cpu_compute: the engine's expert kernel, timed on the CPU for ``--cpu-experts auto``."""
        self.tracer = tracer
        self.store = store
        self.policy = policy
        self.device = torch.device(device)
        self.dtype = dtype
        self.cfg = cache_cfg
        self.prefetch_on = cache_cfg.prefetch_enabled(self.device.type)
        if self.device.type == "cpu" and hasattr(policy, "min_q"):
            # experts come from disk: a wrong guess costs a read the demand loads wait behind
            policy.min_q = max(policy.min_q, DISK_MIN_Q)
        self._sources: dict[ExpertKey, ExpertSource] = {(s.layer, s.expert): s for s in sources}
        if not sources:
            raise ValueError("OffloadedExpertProvider needs at least one ExpertSource")
        self.fmt = expert_format(sources, dtype)
        check_shapes(sources, self.fmt)
        self.num_layers = max(s.layer for s in sources) + 1
        self.expert_bytes = self.fmt.slot_bytes     # budgets count bytes of the stored format
        total = self.expert_bytes * len(self._sources)
        self.budget_bytes = cache_cfg.expert_budget_bytes(total)
        n_dev = min(slot_count(self.budget_bytes, self.expert_bytes, policy.top_k, "expert_budget"),
                    len(self._sources))
        self._routers = list(routers) if routers is not None else None
        self._top_k = policy.top_k
        self._rows: Optional[StepRows] = None
        self.stats_ = CacheStats.for_layers(self.num_layers)

        # disk: open every shard and plan every expert's reads now, so a missing or truncated
        # file fails at start-up and the staging buffers can be sized once
        self.reader = ExpertReader(direct=direct_io)
        for s in sources:
            self.reader.plan(s)

        self._dev = SlotPool(n_dev, self.fmt, self.device)
        self._host: Optional[HostTier] = None
        if self.device.type == "cuda":
            host_budget = resolve_host_budget(cache_cfg.host_budget, total)
            chunks = pinned_plan(host_budget, self.expert_bytes, len(self._sources))
            slot_count(sum(n for _, n in chunks) * self.expert_bytes, self.expert_bytes,
                       policy.top_k, "host_budget")          # a budget too small says so
            self._host = HostTier(chunks, self.fmt, self.device, n_dev)
        self._cpu = None if cpu_compute is None else CpuExperts.create(
            cache_cfg.cpu_experts, self.fmt, self._host, self._dev, cpu_compute)

        # engine-thread state
        self._resident: dict[ExpertKey, int] = {}            # key -> device slot, ready
        self._inflight: dict[ExpertKey, LoadJob] = {}
        self._layer_pins: set[ExpertKey] = set()             # this layer's experts not yet consumed
        self._pending: list[ExpertKey] = []                  # demand loads waiting for a slot
        self._prefetched: set[ExpertKey] = set()             # prefetched, not used yet
        self._protect: set[ExpertKey] = set()             # next layer's look-ahead: no guess evicts it
        self._layer = 0
        self._closed = False
        self._pool = IOPool(cache_cfg.io_threads, self._load, self.reader.new_staging, self.device)
        self._pacer = PrefetchPacer(self.expert_bytes, cache_cfg.io_threads)

    # ---- I/O threads ------------------------------------------------------------------------
    def _load(self, job: LoadJob, staging: torch.Tensor) -> None:
        """Runs on an I/O thread: fill the job's slot(s), nothing else."""
        dev_buf = self._dev.buffer(job.slot)
        if self._host is None:
            job.bytes_disk = self.reader.read_into(job.src, self._read_target(dev_buf), staging)
            return
        self._host.fill(job, dev_buf,
                        lambda host_buf: self.reader.read_into(job.src, self._read_target(host_buf), staging))
        job.bytes_h2d = self.expert_bytes

    def _read_target(self, buf: torch.Tensor) -> torch.Tensor:
        """A slot's bytes as the reader fills them: raw bytes for a store, typed for conversion."""
        return buf if self.fmt.quantized else buf.view(self.fmt.dtype)

    # ---- the ExpertProvider interface -------------------------------------------------------
    def begin_step(self, rows: StepRows, events: Optional[StepEvents] = None) -> None:
        super().begin_step(rows, events)
        self._rows = rows
        self.policy.begin_step(list(rows.seq_ids))

    def end_request(self, seq_id: str, aborted: bool = False) -> None:
        super().end_request(seq_id, aborted)
        self.policy.end_request(seq_id)
        if self.store is not None:
            self.store.request_finished()

    def experts(self, layer: int, topk_ids: torch.Tensor, hidden: Optional[torch.Tensor] = None,
                host_ids: Optional[list[list[int]]] = None) -> Iterator[tuple[int, ProvidedExpert]]:
        if self._closed:
            raise RuntimeError("OffloadedExpertProvider is closed")
        self._layer = layer
        self._pacer.layer_started(layer, self.stats_.total.stall_seconds)
        ids = topk_ids.tolist() if host_ids is None else host_ids      # [T][k]
        routed = self._routed(layer, ids)
        events = self.events
        if events is not None:
            events.route(layer, ids)
        got = self._lookahead(layer, hidden)
        if got is not None:
            scores, ahead = got
            if ahead is not None:
                self.tracer.record_lookahead(layer, ahead)      # type: ignore[union-attr]
            top = ranked_hint_ids(scores, self.policy.top_k)        # ranked once for both
            self.policy.hint(layer + 1, scores, top)
            if self.prefetch_on:
                self._protect = {(layer + 1, e) for e in top.tolist()}
        self.policy.observe(layer, routed)
        self._drain(block=False)

        rows_of = None if self._cpu is None else Counter(e for row in ids for e in set(row))
        keys = [(layer, e) for e in sorted({e for row in ids for e in row} if rows_of is None
                                          else rows_of)]
        self._drop_stale_prefetches(layer, keys)
        self._layer_pins = set(keys)
        try:
            ready: list[ExpertKey] = []
            waiting: set[ExpertKey] = set()
            on_cpu: list[tuple[int, HostExpert]] = []
            for key in keys:
                if key not in self._sources:
                    raise KeyError(f"layer {layer} routed to expert {key[1]}, which the checkpoint "
                                   f"does not have")
                if key in self._resident:
                    self.stats_.add(layer, "hits")
                    ready.append(key)
                    if events is not None and key in self._prefetched:
                        events.status(layer, key[1], PREFETCHED)
                    continue
                self.stats_.add(layer, "misses")
                if events is not None:
                    events.status(layer, key[1], MISS)
                held = None if rows_of is None or key in self._inflight else \
                    self._cpu.take(key, rows_of[key[1]])      # type: ignore[union-attr]
                if held is not None:                # computed where it lies: no copy, no slot
                    self.stats_.add(layer, "cpu_computed")
                    on_cpu.append((key[1], held))
                    continue
                waiting.add(key)
                if key in self._inflight:
                    self._pool.promote(self._inflight[key])
                else:
                    self._pending.append(key)
            self._issue_pending()               # demand loads first, then prefetches
            if self.prefetch_on:
                self._issue_prefetches(layer)
            for e, held in on_cpu:     # first: reading x to the host waits for nothing queued
                yield e, held
                self._cpu.release((layer, e))       # type: ignore[union-attr]
            for key in ready:
                yield self._use(key)
            while waiting:
                done = sorted(k for k in waiting if k in self._resident)
                if not done:
                    self._wait_for_completion(layer)
                    continue
                for key in done:
                    waiting.discard(key)
                    yield self._use(key)
        finally:
            self._layer_pins = set()
            if self._cpu is not None:
                self._cpu.release_all()

    def _use(self, key: ExpertKey) -> tuple[int, ExpertWeights]:
        """Hand ``key`` to the layer; when the layer comes back for the next one it is done."""
        slot = self._resident[key]
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats_.add(key[0], "prefetch_used")
        self.policy.on_access(key)
        if self._host is not None:
            self._host.used(key)
            self._host.wait_ready(slot)
        # unpinned now: the generator resumes only after the layer used the weights (on CUDA
        # the kernels are queued; a later load into this slot waits on free_event first)
        self._layer_pins.discard(key)
        return key[1], self._dev.views(slot)

    # ---- routing helpers --------------------------------------------------------------------
    def _routed(self, layer: int, ids: list[list[int]]) -> Routed:
        """Per request, the expert ids its rows chose: split once, by the tracer when there
        is one (it needs the same split), and that object goes to the policy."""
        if self.tracer is not None:
            got = self.tracer.record(layer, ids)
            if isinstance(got, Routed):
                return got
        return split_routing(self._rows, ids)

    # ---- loads and evictions (engine thread) ------------------------------------------------
    def _pinned(self) -> set[ExpertKey]:
        return self._layer_pins | self._inflight.keys()

    def _known(self) -> UnionKeys:
        """Resident or in flight, as a view (no set built per decision)."""
        return UnionKeys(self._resident, self._inflight)

    def _make_room(self, n: int, protect: Collection[ExpertKey] = ()) -> None:
        """Evict up to ``n`` in one ``victims`` call, never a pinned one or one in ``protect``."""
        pinned = self._pinned() | set(protect)
        for victim in self.policy.victims(self._known(), pinned, self._layer, n):
            if victim in pinned or victim not in self._resident:
                raise RuntimeError(f"policy {self.policy.name!r} chose {victim} to evict, which "
                                   f"is {'pinned' if victim in pinned else 'not resident'}")
            self._evict(victim)

    def _take_slot(self, protect: Collection[ExpertKey] = ()) -> Optional[int]:
        """A free device slot, evicting the policy's victim (not in ``protect``); None: all pinned."""
        slot = self._dev.acquire()
        if slot is None:
            self._make_room(1, protect)
            slot = self._dev.acquire()
        return slot

    def _evict(self, key: ExpertKey) -> None:
        self._dev.release(self._resident.pop(key))
        self.stats_.add(key[0], "evictions")
        if self._host is not None:
            self._host.used(key)            # the next to come back: its host copy stays longest
        if self.events is not None:
            self.events.evicted.append(key)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats_.add(key[0], "prefetch_wasted")
        self.policy.on_evict(key)

    def _issue(self, key: ExpertKey, demand: bool) -> bool:
        """Start loading ``key`` into a device slot; False when no slot can be had right now."""
        if self._host is not None and not self._host.can_prepare(key):
            return False                    # every host slot is in use by a load: evict nothing
        # a guess never evicts what this or the next layer is expected to use
        slot = self._take_slot(() if demand else self._protect)
        if slot is None:
            return False
        job = LoadJob(key, self._sources[key], slot, demand)
        if self._host is not None and not self._host.prepare(job):
            self._dev.release(slot)
            return False
        self._inflight[key] = job
        self._pool.submit(job)
        return True

    def _issue_pending(self) -> None:
        """Issue waiting demand loads, in order, as far as slots allow."""
        new = sum(1 for k in self._pending if k not in self._resident and k not in self._inflight)
        if new > self._dev.free_count:
            self._make_room(new - self._dev.free_count)
        while self._pending:
            key = self._pending[0]
            if key in self._resident or key in self._inflight:
                self._pending.pop(0)
                continue
            if not self._issue(key, demand=True):
                return
            self._pending.pop(0)
            self.stats_.add(key[0], "loads")

    def _issue_prefetches(self, layer: int) -> None:
        self._pacer.io_sample(*self._pool.io_counters())
        limit = self._pacer.allowed(len(self._inflight))
        if limit <= 0:
            return
        known = self._known()
        pending = set(self._pending)
        for key in self.policy.prefetch(layer, known, limit)[:limit]:
            if key in known or key in pending or key not in self._sources:
                continue
            if not self._issue(key, demand=False):
                return
            self._prefetched.add(key)
            self.stats_.add(key[0], "prefetch_issued")
            if self.events is not None:
                self.events.prefetched.append(key)

    def _drop_stale_prefetches(self, layer: int, keys: list[ExpertKey]) -> None:
        """Prefetches for ``layer`` that it did not route and no thread has started are
        withdrawn: their read would only delay the demand reads behind it."""
        wanted = set(keys)
        for key, job in list(self._inflight.items()):
            if key[0] != layer or job.demand or key in wanted or not self._pool.cancel(job):
                continue
            del self._inflight[key]
            if self._host is not None:
                self._host.withdrawn(job)
            self._dev.release(job.slot)
            self._prefetched.discard(key)
            self.stats_.add(layer, "prefetch_dropped")

    def _drain(self, block: bool) -> None:
        """Process finished loads (blocking for the first one if ``block``)."""
        while True:
            try:
                job = self._pool.completions.get(block=block)
            except queue.Empty:
                return
            block = False
            self._complete(job)

    def _complete(self, job: LoadJob) -> None:
        del self._inflight[job.key]
        if self._host is not None:
            self._host.finished(job)
        if job.error is not None:
            self._dev.release(job.slot)
            self._prefetched.discard(job.key)
            raise ExpertReadError(f"loading expert {job.key[1]} of MoE layer {job.key[0]} "
                                  f"failed: {job.error}") from job.error
        self._resident[job.key] = job.slot
        layer = job.key[0]
        self.stats_.add(layer, "bytes_disk", job.bytes_disk)
        self.stats_.add(layer, "bytes_h2d", job.bytes_h2d)
        if self.events is not None:
            self.events.bytes_read += job.bytes_disk
        if self._host is not None:
            self.stats_.add(layer, "host_misses" if job.from_disk else "host_hits")
        self.policy.on_load(job.key)

    def _wait_for_completion(self, layer: int) -> None:
        """Block until a load finishes; the engine thread is stalled meanwhile."""
        self._issue_pending()
        if not self._inflight:
            raise RuntimeError(f"layer {layer}: {len(self._pending)} experts wait for a slot but "
                               "no load is in flight (every slot pinned?)")
        t0 = time.perf_counter()
        self._drain(block=True)
        stalled = time.perf_counter() - t0
        self.stats_.add(layer, "stall_seconds", stalled)
        if self.events is not None:
            self.events.stall_seconds += stalled
        self._issue_pending()

    # ---- shutdown (reporting: cache/offload_report.py) -------------------------------------
    def close(self) -> None:
        """Stop the I/O threads (reads in progress finish) and close the files."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        self.reader.close()
        if self.store is not None:
            self.store.flush()
