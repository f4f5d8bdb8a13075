"""Design 1: separate pools per layer group, split by a fixed ratio (TensorRT-LLM's per-window
pools for variable sliding window attention).

    pool bytes ──split──► [ sliding pool: pages of page_size x its bytes/token ]
                          [ full pool:    pages of page_size x its bytes/token ]
                          [ state pool:   one slot of its state bytes per running request ]

TensorRT-LLM (BlockManager::calculateWindowSizeToShare) gives each window size a share of the
pool proportional to window x its cache bytes per token; full attention's window is the longest
sequence (max_model_len). `split: window` does that (a chunked group's window is its chunk; a
state group's weight is its bytes per request); a list of fractions (one per group, in the
model's group order) sets it by hand. Either way a group's pool holds at least one request of
max_model_len at its peak (its floor; a state group: one state), taken from the other groups'
shares, so that any request the model serves can run alone. The peak of a sliding / chunked
group is bounded by the scheduler's step (`max_num_batched_tokens`, passed from the run's
config): a step from `length` to `length + C` holds only the pages of [first_needed(length),
length + C), i.e. at most ceil((page_size - 1 + window - 1 + C) / page_size) pages
(hits.peak_pages), however long the prompt; without it (None, or `preemption: swap`, whose
re-admission gives a request all its swapped positions at once) a window is counted whole, as a
prefill chunk may span it. Where the pool cannot hold every group's floor, the floors that do not
grow with max_model_len (state groups, and sliding / chunked ones with a step bound) are granted
first, in group order while they fit; the others share the rest by their weights (their pools
then reject the requests they can never hold). The split never moves: a group whose pool is
full stops admission although the other pools have room; those free bytes are reported as external
fragmentation while a request waits (memory stranded by the split). Bytes a pool cannot use
(less than one page) are internal.

Each pool is paged on its own (one page table per group): sliding and chunked groups drop the
pages that fall out of their window as decoding goes on (TensorRT-LLM frees out-of-window
blocks), and reuse is per pool. Hit rule: the shared one (hits.longest_hit): every group holds
its needed pages at the hit point; no state snapshots (a model with state layers hits 0).
"""
from __future__ import annotations

from kvbench.sizes import PoolGeometry
from kvbench.strategies.hybrid import hits
from kvbench.strategies.hybrid.base import POOL, GroupSlotStates, TableSpec
from kvbench.strategies.hybrid.paged_groups import GroupPaged, StateSpec


class SeparatePools(GroupPaged):
    """One pool per layer group. split: "window" (TensorRT-LLM's rule) or one fraction per group."""

    hit_rule = ("every group's pool holds its needed pages at the hit point (full: all earlier; sliding: last "
                "window-1 tokens; chunked: the current chunk); state layers: no snapshots, hit 0")

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 16,
                 geometry: PoolGeometry | None = None,
                 split: str | list = "window", prefix_caching: bool = True,
                 max_num_batched_tokens: int | None = None, preemption: str = "recompute",
                 name: str = "hybrid_separate") -> None:
        """max_num_batched_tokens: the scheduler's (most positions one admit or grow gives a
        request; the yaml interpolates it), None: unknown, windows counted whole. preemption: the
        scheduler's; `swap` also counts windows whole (a swapped request is re-admitted with all
        its swapped positions at once)."""
        self.split = split if isinstance(split, str) else [float(x) for x in split]
        if max_num_batched_tokens is not None and (isinstance(max_num_batched_tokens, bool) or
                                                   not isinstance(max_num_batched_tokens, int) or
                                                   max_num_batched_tokens < 1):
            raise ValueError(f"{name}: max_num_batched_tokens={max_num_batched_tokens!r} must be an int >= 1 "
                             "(the scheduler's) or null")
        if preemption not in ("recompute", "swap"):
            raise ValueError(f"{name}: preemption={preemption!r} must be recompute or swap (the scheduler's)")
        self.max_num_batched_tokens, self.preemption = max_num_batched_tokens, preemption
        self._step_tokens = max_num_batched_tokens if preemption == "recompute" else None
        super().__init__(capacity_tokens, max_model_len, page_size, name, geometry, prefix_caching)

    def weights(self) -> list[float]:
        """Each group's share of the pool's bytes (sums to 1). Pure."""
        if self.split == "window":
            w = []
            for g in self.groups:
                span = {"full": self.max_model_len, "sliding": g.window, "chunked": g.chunk}.get(g.kind)
                w.append(g.bytes_per_request if span is None else g.bytes_per_token * min(span, self.max_model_len))
        elif isinstance(self.split, list):
            w = self.split
            if len(w) != len(self.groups) or min(w) <= 0:
                raise ValueError(f"{self.name}: split={w} must give one fraction > 0 per layer group "
                                 f"({', '.join(g.label for g in self.groups)})")
        else:
            raise ValueError(f"{self.name}: split={self.split!r} must be 'window' or a list of fractions")
        total = float(sum(w))
        return [x / total for x in w]

    def _page_bytes(self, i: int) -> int:
        g = self.groups[i]
        return g.bytes_per_request if g.kind == "state" else self.page_size * g.bytes_per_token

    def floors(self) -> list[int]:
        """Bytes of each group's floor: its peak pages for one request of max_model_len
        (hits.peak_pages with the scheduler's step; a state group: one state). Pure."""
        return [self._page_bytes(i) * (1 if g.kind == "state" else
                                       hits.peak_pages(g, self.max_model_len, self.page_size, self._step_tokens))
                for i, g in enumerate(self.groups)]

    def pool_bytes_per_group(self) -> list[int]:
        """Bytes of each group's pool: its share of the pool, but at least its floor, the floors
        taken from the other groups in proportion to their shares. Where the floors of all groups
        below theirs do not fit together, only the bounded ones (`_bounded`) are granted, in group
        order while they fit. Pure."""
        shares = self.weights()
        floor = self.floors()
        nbytes = [int(self.pool_bytes * w) for w in shares]
        low = [i for i in range(len(nbytes)) if nbytes[i] < floor[i]]
        if low and sum(floor[i] for i in low) >= self.pool_bytes:
            granted: list[int] = []
            for i in low:
                if self._bounded(i) and sum(floor[j] for j in granted) + floor[i] < self.pool_bytes:
                    granted.append(i)
            low = granted
        if low and sum(floor[i] for i in low) < self.pool_bytes:
            rest = self.pool_bytes - sum(floor[i] for i in low)
            rest_w = sum(w for i, w in enumerate(shares) if i not in low)
            nbytes = [floor[i] if i in low else int(rest * shares[i] / rest_w) for i in range(len(nbytes))]
        return nbytes

    def _bounded(self, i: int) -> bool:
        """True when group i's floor does not grow with max_model_len: a state group, or a
        sliding / chunked one whose peak the scheduler's step bounds. Pure."""
        kind = self.groups[i].kind
        return kind == "state" or (kind in ("sliding", "chunked") and self._step_tokens is not None)

    def _layout(self):
        tables, spaces, states, leftover = [], [], [], {POOL: self.pool_bytes}
        for i, (g, nbytes) in enumerate(zip(self.groups, self.pool_bytes_per_group())):
            page_bytes = self._page_bytes(i)
            n = nbytes // page_bytes
            if g.kind == "state":
                states.append(StateSpec(i, len(spaces), 1))
            else:
                tables.append(TableSpec(i, g.num_layers, self.page_size, len(spaces), n, page_bytes))
            spaces.append((n, page_bytes))
            leftover[g.label] = nbytes - n * page_bytes
            leftover[POOL] -= nbytes
        return tables, spaces, leftover, states

    def _external(self, out: dict[str, GroupSlotStates], waiting_kv_len: int | None) -> None:
        """While a request waits whose peak (_peak_pages) does not fit some group's pool now
        (free + cached pages), the free pages of the other pools are stranded: external."""
        if waiting_kv_len is None:
            return
        need = self._peak_pages(waiting_kv_len)
        short = {s for s, n in need.items() if n > self._spaces[s].available()}
        if not short:
            return
        for s, sp in enumerate(self._spaces):
            if s not in short and sp.free:
                label = self._owner[s]
                st = out[label]
                out[label] = st._replace(free=st.free - len(sp.free) * sp.page_bytes,
                                         external=st.external + len(sp.free) * sp.page_bytes)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.page_size}" + ("" if self.prefix_caching else "-nocache")
