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
max_model_len (pages counted whole, as a prefill chunk may span a window; a state group: one
state), taken from the other groups' shares, so that any request the model serves can run alone.
The split never moves: a group whose pool is full stops
admission although the other pools have room; those free bytes are reported as external
fragmentation while a request waits (memory stranded by the split). Bytes a pool cannot use
(less than one page) are internal.

Each pool is paged on its own (one page table per group): sliding and chunked groups drop the
pages that fall out of their window as decoding goes on (TensorRT-LLM frees out-of-window
blocks), and reuse is per pool. Hit rule: the shared one (hits.longest_hit): every group holds
its needed pages at the hit point; no state snapshots (a model with state layers hits 0).
"""
from __future__ import annotations

from kvbench.sizes import PoolGeometry
from kvbench.strategies.hybrid.base import POOL, GroupSlotStates, TableSpec
from kvbench.strategies.hybrid.paged_groups import GroupPaged, StateSpec


class SeparatePools(GroupPaged):
    """One pool per layer group. split: "window" (TensorRT-LLM's rule) or one fraction per group."""

    hit_rule = ("every group's pool holds its needed pages at the hit point (full: all earlier; sliding: last "
                "window-1 tokens; chunked: the current chunk); state layers: no snapshots, hit 0")

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int = 16,
                 geometry: PoolGeometry | None = None,
                 split: str | list = "window", prefix_caching: bool = True, name: str = "hybrid_separate") -> None:
        self.split = split if isinstance(split, str) else [float(x) for x in split]
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

    def pool_bytes_per_group(self) -> list[int]:
        """Bytes of each group's pool: its share of the pool, but at least one request of
        max_model_len (its pages counted whole: one prefill chunk may span a window; a state
        group: one state), the floors taken from the other groups in proportion to their shares. Pure."""
        shares = self.weights()
        floor = [self._page_bytes(i) * (1 if g.kind == "state" else -(-self.max_model_len // self.page_size))
                 for i, g in enumerate(self.groups)]
        nbytes = [int(self.pool_bytes * w) for w in shares]
        low = [i for i in range(len(nbytes)) if nbytes[i] < floor[i]]
        if low and sum(floor[i] for i in low) < self.pool_bytes:
            rest = self.pool_bytes - sum(floor[i] for i in low)
            rest_w = sum(w for i, w in enumerate(shares) if i not in low)
            nbytes = [floor[i] if i in low else int(rest * shares[i] / rest_w) for i in range(len(nbytes))]
        return nbytes

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
        """While a request waits whose whole length does not fit some group's pool now (free +
        cached pages), the free pages of the other pools are stranded: external."""
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
