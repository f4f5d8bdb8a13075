"""Paging per table over page-id spaces: the machinery designs 1 (separate.py) and 2 (unified.py)
share. A design says only how the pool's bytes become spaces and tables (`_layout`).

    request r, gemma-like (sliding window 8, page 4), length 14, table 0 = sliding, 1 = full:
        table 0: [-1, 7, 3, 9]        positions 0..3 are outside the window (first_needed = 7):
                                      page freed at the grow that passed them (cached if hashed)
        table 1: [0, 1, 2, 5]         full attention keeps every page

Pages: ref > 0 (held), cached (ref 0, hashed, in its space's LRU), free (a stack, or never
handed out). A full page is hashed (chained hash of every id up to its end, per page size) once
its positions are computed, at its request's next grow or release (kvbench's `computed`
visibility); a hit is verified against the page's stored ids. Pages entirely before
`hits.first_needed(group, length)` are dropped from the request's table at its next grow (vLLM's
`remove_skipped_blocks`): hashed ones stay cached for later hits, the rest are freed.

State groups: `_state_bytes[g]` per running request, taken at admission, freed at release; how
many bytes it occupies in the pool (a slot of a state pool, pages of the shared pool) is the
design's (`_state_cost`). No snapshots are kept: the hit rule allows 0 on a model with state
layers (hits.longest_hit without has_snapshot).

Costs: allocate/free O(1) per page (stack, OrderedDict LRU); a grow frees out-of-window pages in
O(freed); a hit search hashes the prompt once per page size (O(prompt)), then O(candidate points
x window pages); slot_states is O(running x tables) (out-of-window heads of shared pages).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from math import lcm
from typing import NamedTuple

import numpy as np

from kvbench.strategies.base import Admission, InvariantError, RequestId
from kvbench.strategies.hybrid import hits
from kvbench.strategies.hybrid.base import NULL_PAGE, POOL, GroupSlotStates, HybridStrategy, TableSpec

_ROOT = 0x6B7662656E6368


class _Space:
    """One pool of `num_pages` pages of `page_bytes` bytes (page ids 0..num_pages-1)."""

    def __init__(self, num_pages: int, page_bytes: int) -> None:
        self.num_pages, self.page_bytes = num_pages, page_bytes
        self.free = list(range(num_pages - 1, -1, -1))  # pops 0, 1, 2, ...
        self.ref = [0] * num_pages
        self.fill = [0] * num_pages
        self.table = [-1] * num_pages  # the table (index) whose K/V the page holds, while held or cached
        self.hash: list[tuple | None] = [None] * num_pages  # (table, chain hash) while in `index`
        self.stored: list[bytes | None] = [None] * num_pages  # its ids, to verify a hit
        self.index: dict[tuple, int] = {}  # (table, chain hash) -> page
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached pages, least recent first

    def available(self) -> int:
        return len(self.free) + len(self.lru)


@dataclass(slots=True)
class _Req:
    tokens: np.ndarray
    kv_len: int
    length: int  # positions with room (computed between calls)
    pages: list[list[int]]  # per table: page ids, NULL_PAGE where dropped
    first: list[int]  # per table: index of its first held page
    hashed: list[int]  # per table: its first pages registered in the index
    chains: dict[int, list[int]] = field(default_factory=dict)  # page size -> chain hashes of full pages
    computed: int = 0  # positions computed at its last admit / grow: what its tables were trimmed to
    hash_at: int = 0  # length at which some table's next page is full (_register has work)


class StateSpec(NamedTuple):
    """A state group's memory: `pages` pages of space `space` per running request."""

    group: int
    space: int
    pages: int


class GroupPaged(HybridStrategy):
    """Paged tables over spaces. A design defines `_layout()` (and may define `_external`)."""

    # most positions one admit or grow gives a request (the scheduler's max_num_batched_tokens),
    # if the design knows it: bounds a sliding/chunked table's peak (hits.peak_pages); None: whole
    _step_tokens: int | None = None

    def __init__(self, capacity_tokens: int, max_model_len: int, page_size: int, name: str, geometry,
                 prefix_caching: bool = True) -> None:
        super().__init__(capacity_tokens, max_model_len, page_size, name, geometry)
        self.prefix_caching = self.caches_prefixes = bool(prefix_caching)
        tables, spaces, self._leftover, states = self._layout()
        self._tables: tuple[TableSpec, ...] = tuple(tables)
        self._spaces: list[_Space] = [_Space(n, b) for n, b in spaces]
        self._states: tuple[StateSpec, ...] = tuple(states)
        self._owner = [self._space_owner(s) for s in range(len(self._spaces))]
        self._state_held: dict[RequestId, list[list[int]]] = {}  # per request, per state spec: its pages
        self._hit_step = lcm(*(t.page_size for t in self._tables))
        # bytes of one token of a table (its layers), and of its page that no token uses
        self._tb = [t.layers * self.groups[t.group].bytes_per_layer_token for t in self._tables]
        self._pad = [t.page_bytes - t.page_size * tb for t, tb in zip(self._tables, self._tb)]
        if min(self._pad) < 0:
            raise ValueError(f"{name}: a page of {min(t.page_bytes for t in self._tables)} bytes is smaller "
                             "than its table's page_size tokens")
        self._reqs: dict[RequestId, _Req] = {}
        self._tok = [0] * len(self._tables)  # per table: filled positions of held pages
        self._held = [0] * len(self._tables)  # per table: held pages
        self._cached = [0] * len(self._tables)  # per table: cached pages
        self._reserved = [0] * len(self._tables)  # per table: reserved positions
        # hot-path copies of each table's spec (plain lists: grow runs every step for every request)
        self._ps = [t.page_size for t in self._tables]
        self._space_of = [t.space for t in self._tables]
        # hits.first_needed(group, p) per table as (kind, bound): 0 full, 1 sliding (window), 2 chunked (chunk)
        self._bound = [({"sliding": 1, "chunked": 2}.get(self.groups[t.group].kind, 0),
                        self.groups[t.group].window or self.groups[t.group].chunk) for t in self._tables]

    # ---- what a design defines ---------------------------------------------------------------
    def _layout(self) -> tuple[list[TableSpec], list[tuple[int, int]], dict[str, int], list[StateSpec]]:
        """(tables, spaces as (num_pages, page_bytes), bytes no page can use per group label or
        POOL, state specs)."""
        raise NotImplementedError

    def _external(self, out: dict[str, GroupSlotStates], waiting_kv_len: int | None) -> None:
        """Move free bytes that cannot serve the waiting request to `external` (default: none:
        any free page serves any table of its space)."""

    def _space_owner(self, s: int) -> str:
        """The group label free pages of space `s` count under (POOL when groups share it)."""
        owners = {self.groups[t.group].label for t in self._tables if t.space == s}
        owners |= {self.groups[st.group].label for st in self._states if st.space == s}
        return owners.pop() if len(owners) == 1 else POOL

    # ---- contract -----------------------------------------------------------------------------
    @property
    def tables(self) -> tuple[TableSpec, ...]:
        return self._tables

    def table(self, rid, t) -> np.ndarray:
        return np.asarray(self._reqs[rid].pages[t], dtype=np.int32)

    def never_fits(self, kv_len: int) -> str | None:
        if kv_len + 1 > self.max_model_len:
            return f"max_model_len: prompt + output = {kv_len + 1} tokens exceeds max_model_len {self.max_model_len}"
        need = self._peak_pages(kv_len)
        for s, n in need.items():
            if n > self._spaces[s].num_pages:
                how = ("windows counted whole" if self._step_tokens is None else
                       f"windows plus a step of {self._step_tokens} tokens")
                return (f"pool: needs {kv_len} KV slots ({n} pages of space {s}, {how}), "
                        f"the pool holds {self._spaces[s].num_pages}")
        return None

    def _peak_pages(self, kv_len: int) -> dict[int, int]:
        """Pages per space a request of kv_len holds at most, alone: hits.peak_pages per table
        (with `_step_tokens` None, the default, a window is counted whole, as one prefill chunk
        may span it; a design that knows the scheduler's largest step sets it). Pure."""
        need: dict[int, int] = {}
        for t in self._tables:
            need[t.space] = need.get(t.space, 0) + hits.peak_pages(self.groups[t.group], kv_len, t.page_size,
                                                                   self._step_tokens)
        for st in self._states:
            need[st.space] = need.get(st.space, 0) + st.pages
        return need

    def cached_prefix_len(self, tokens, num_prompt) -> int:
        if not self.prefix_caching:
            return 0
        return self._longest_hit(tokens, num_prompt, {})[0]

    def admit(self, rid, tokens, kv_len, num_prompt, max_new) -> Admission:
        chains: dict[int, list[int]] = {}
        cached, hit_pages = self._longest_hit(tokens, num_prompt, chains) if self.prefix_caching else (0, {})
        length = cached + min(max_new, num_prompt - cached)
        need: dict[int, int] = {st.space: 0 for st in self._states}
        for st in self._states:
            need[st.space] += st.pages
        for t, spec in enumerate(self._tables):  # new pages, plus hits that leave the cached set
            sp = self._spaces[spec.space]
            revived = sum(1 for p in hit_pages.get(t, ()) if sp.ref[p] == 0)
            new = -(-length // spec.page_size) - cached // spec.page_size
            need[spec.space] = need.get(spec.space, 0) + new + revived
        if any(n > self._spaces[s].available() for s, n in need.items()):
            return Admission(False)
        req = _Req(tokens, kv_len, cached, [], [], [], {ps: c[: cached // ps] for ps, c in chains.items()}, cached)
        for t, spec in enumerate(self._tables):
            sp = self._spaces[spec.space]
            held = hit_pages.get(t, [])
            skip = hits.first_needed(self.groups[spec.group], cached) // spec.page_size
            for p in held:
                if sp.ref[p] == 0:
                    del sp.lru[p]
                    self._cached[t] -= 1
                    self._held[t] += 1
                    self._tok[t] += sp.fill[p]
                sp.ref[p] += 1
            req.pages.append([NULL_PAGE] * skip + list(held))
            req.first.append(skip)
            req.hashed.append(skip + len(held))
        self._reqs[rid] = req
        self._state_held[rid] = [[self._take_state(i, self._spaces[st.space]) for _ in range(st.pages)]
                                 for i, st in enumerate(self._states)]
        self._extend(req, length)
        return Admission(True, cached)

    def grow(self, rid, num_tokens) -> bool:
        req = self._reqs[rid]
        new_len = req.length + num_tokens
        if new_len > req.kv_len:
            raise ValueError(f"request {rid} grows past its final length {req.kv_len}")
        length, spaces, first = req.length, self._spaces, req.first
        need = [0] * len(spaces)
        drops = []
        for t, ps in enumerate(self._ps):  # pages to take, less the pages its window frees
            pages = req.pages[t]
            kind, bound = self._bound[t]
            drop = 0
            if kind:  # hits.first_needed, inline
                lo = length - bound + 1 if kind == 1 else length // bound * bound
                drop = min(max(lo, 0) // ps, len(pages))
            freed = 0
            if drop > first[t]:
                ref = spaces[self._space_of[t]].ref
                freed = sum(1 for p in pages[first[t]:drop] if ref[p] == 1)
            drops.append(drop)
            need[self._space_of[t]] += -(-new_len // ps) - len(pages) - freed
        for sp, n in zip(spaces, need):
            if n > 0 and n > len(sp.free) + len(sp.lru):
                return False
        if self.prefix_caching:
            self._register(req)
        self._trim(req, drops)
        self._extend(req, new_len)
        return True

    def release(self, rid) -> None:
        req = self._reqs.pop(rid)
        if self.prefix_caching:
            self._register(req)
        for t, spec in enumerate(self._tables):
            sp = self._spaces[spec.space]
            pages = req.pages[t]
            self._reserved[t] -= self._res_of(req, t)
            for i in range(len(pages) - 1, req.first[t] - 1, -1):  # the tail first
                self._unref(t, sp, pages[i])
        for i, pages in enumerate(self._state_held.pop(rid)):
            sp = self._spaces[self._states[i].space]
            for p in pages:
                sp.ref[p], sp.table[p] = 0, -1
                sp.free.append(p)

    def evict(self, num_slots) -> int:
        goal, freed = num_slots * self.unit_bytes, 0
        for sp in self._spaces:
            while freed < goal and sp.lru:
                sp.free.append(self._evict_one(sp))
                freed += sp.page_bytes
        return -(-freed // self.unit_bytes)

    # ---- helpers ------------------------------------------------------------------------------
    def _chain(self, tokens: np.ndarray, ps: int, upto: int, chains: dict[int, list[int]]) -> list[int]:
        c = chains.setdefault(ps, [])
        for i in range(len(c), upto):
            c.append(hash((c[-1] if i else _ROOT, tokens[i * ps:(i + 1) * ps].tobytes())))
        return c

    def _longest_hit(self, tokens: np.ndarray, num_prompt: int, chains: dict) -> tuple[int, dict[int, list[int]]]:
        """(hit length, {table: pages needed for it}) by the shared rule (hits.longest_hit). Pure
        but for `chains` (the caller's scratch)."""
        max_point = num_prompt - 1
        tabs = [(self.groups[t.group], t.page_size) for t in self._tables]

        def page(t: int, j: int) -> int | None:
            spec = self._tables[t]
            ps, sp = spec.page_size, self._spaces[spec.space]
            h = self._chain(tokens, ps, j + 1, chains)[j]
            p = sp.index.get((t, h))
            if p is None or sp.stored[p] != tokens[j * ps:(j + 1) * ps].tobytes():
                return None
            return p

        states = [(self.groups[st.group], 0) for st in self._states]  # no snapshots: a state group allows 0
        point = hits.longest_hit(tabs + states, lambda t, j: page(t, j) is not None, max_point, self._hit_step)
        if not point:
            return 0, {}
        return point, {t: [page(t, j) for j in hits.pages_needed(g, point, ps)] for t, (g, ps) in enumerate(tabs)}

    def _take(self, t: int, sp: _Space) -> int:
        if sp.free:
            p = sp.free.pop()
        else:
            p = self._evict_one(sp)
        sp.ref[p], sp.fill[p], sp.table[p] = 1, 0, t
        self._held[t] += 1
        return p

    def _take_state(self, i: int, sp: _Space) -> int:
        """A page for state spec i (marked table -1 - i; never hashed)."""
        p = sp.free.pop() if sp.free else self._evict_one(sp)
        sp.ref[p], sp.fill[p], sp.table[p] = 1, 0, -1 - i
        return p

    def _evict_one(self, sp: _Space) -> int:
        p, _ = sp.lru.popitem(last=False)
        del sp.index[sp.hash[p]]
        self._cached[sp.table[p]] -= 1
        sp.hash[p] = sp.stored[p] = None
        sp.table[p] = -1
        return p

    def _unref(self, t: int, sp: _Space, p: int) -> None:
        sp.ref[p] -= 1
        if sp.ref[p]:
            return
        self._held[t] -= 1
        self._tok[t] -= sp.fill[p]
        if sp.hash[p] is not None:
            sp.lru[p] = None
            self._cached[t] += 1
        else:
            sp.table[p] = -1
            sp.free.append(p)

    def _res_of(self, req: _Req, t: int) -> int:
        ps = self._tables[t].page_size
        return min(req.kv_len, len(req.pages[t]) * ps) - req.length

    def _extend(self, req: _Req, new_len: int) -> None:
        """Pages and fills for positions [length, new_len) in every table (room checked)."""
        length, kv_len, spaces, reserved, tok = req.length, req.kv_len, self._spaces, self._reserved, self._tok
        for t, ps in enumerate(self._ps):
            sp, pages = spaces[self._space_of[t]], req.pages[t]
            tok[t] += new_len - length
            if new_len <= len(pages) * ps:  # (a decode inside its last page: the common case)
                sp.fill[pages[-1]] += new_len - length
                reserved[t] -= new_len - length
                continue
            before = min(kv_len, len(pages) * ps) - length  # its reserved positions (_res_of)
            fill = sp.fill
            pos = length
            while pos < new_len:
                if pos // ps == len(pages):
                    pages.append(self._take(t, sp))
                n = min(ps - pos % ps, new_len - pos)
                fill[pages[pos // ps]] += n
                pos += n
            reserved[t] += min(kv_len, len(pages) * ps) - new_len - before
        req.computed = length
        req.length = new_len

    def _register(self, req: _Req) -> None:
        """Hash the request's full, computed pages not hashed yet (positions < length)."""
        if req.length < req.hash_at:
            return
        for t, spec in enumerate(self._tables):
            ps, sp, pages = spec.page_size, self._spaces[spec.space], req.pages[t]
            full = req.length // ps
            if req.hashed[t] >= full:
                continue
            chain = self._chain(req.tokens, ps, full, req.chains)
            for i in range(req.hashed[t], full):
                p = pages[i]
                key = (t, chain[i])
                if p != NULL_PAGE and sp.hash[p] is None and key not in sp.index:
                    sp.index[key] = p
                    sp.hash[p] = key
                    sp.stored[p] = req.tokens[i * ps:(i + 1) * ps].tobytes()
            req.hashed[t] = full
        req.hash_at = min((h + 1) * ps for h, ps in zip(req.hashed, self._ps))

    def _trim(self, req: _Req, drops: list[int]) -> None:
        """Drop the pages its groups no longer read: table t's first drops[t] pages (those entirely
        before first_needed(length), as grow computed them)."""
        for t, drop in enumerate(drops):
            if drop <= req.first[t]:
                continue
            sp, pages = self._spaces[self._space_of[t]], req.pages[t]
            for i in range(req.first[t], drop):
                self._unref(t, sp, pages[i])
                pages[i] = NULL_PAGE
            req.first[t] = drop

    # ---- accounting ---------------------------------------------------------------------------
    def _out_of_window(self) -> list[int]:
        """Per table: positions of held pages that no holder reads any more (the head of a first
        held page partly before first_needed(computed)); a shared page counts once. Pure."""
        out = [0] * len(self._tables)
        for t, ps in enumerate(self._ps):
            kind, bound = self._bound[t]
            if not kind:
                continue
            sp = self._spaces[self._space_of[t]]
            fill, ref = sp.fill, sp.ref
            heads: dict[int, list[int]] = {}
            for req in self._reqs.values():
                i, pages, c = req.first[t], req.pages[t], req.computed
                if i >= len(pages):
                    continue
                lo = c - bound + 1 if kind == 1 else c // bound * bound  # hits.first_needed, inline
                off = min(lo - i * ps, fill[pages[i]])
                if off > 0:
                    if ref[pages[i]] == 1:
                        out[t] += off
                    else:  # shared: out of window only if out for every holder
                        heads.setdefault(pages[i], []).append(off)
            for p, offs in heads.items():
                if len(offs) == sp.ref[p]:  # every holder reads only its tail
                    out[t] += min(offs)
        return out

    def group_slot_states(self, waiting_kv_len: int | None) -> dict[str, GroupSlotStates]:
        out: dict[str, GroupSlotStates] = {g.label: GroupSlotStates() for g in self.groups}
        out[POOL] = GroupSlotStates()
        oow = self._out_of_window()
        for t, spec in enumerate(self._tables):
            tb, pb = self._tb[t], spec.page_bytes
            held = self._held[t] * pb
            token = (self._tok[t] - oow[t]) * tb
            reserved = self._reserved[t] * tb
            out[self.groups[spec.group].label] += GroupSlotStates(
                token=token, reserved=reserved, internal=held - token - reserved - oow[t] * tb,
                cached=self._cached[t] * pb, out_of_window=oow[t] * tb)
        for s, sp in enumerate(self._spaces):
            out[self._owner[s]] += GroupSlotStates(free=len(sp.free) * sp.page_bytes)
        for label, nbytes in self._leftover.items():
            out[label] += GroupSlotStates(internal=nbytes)
        running = len(self._reqs)
        for st in self._states:
            g = self.groups[st.group]
            token = running * g.bytes_per_request
            out[g.label] += GroupSlotStates(token=token, internal=running * st.pages * self._spaces[st.space].page_bytes
                                            - token)
        self._external(out, waiting_kv_len)
        return out

    def check_invariants(self) -> None:
        owners = [[0] * sp.num_pages for sp in self._spaces]
        tok, held, res = [0] * len(self._tables), [0] * len(self._tables), [0] * len(self._tables)
        for rid, req in self._reqs.items():
            for t, spec in enumerate(self._tables):
                pages, ps = req.pages[t], spec.page_size
                if len(pages) != -(-req.length // ps):
                    raise InvariantError(f"request {rid} table {t}: {len(pages)} pages for {req.length} positions")
                first = hits.first_needed(self.groups[spec.group], req.computed) // ps
                if req.first[t] > max(first, 0) or any(p != NULL_PAGE for p in pages[:req.first[t]]) or \
                        any(p == NULL_PAGE for p in pages[req.first[t]:]):
                    raise InvariantError(f"request {rid} table {t}: held pages {pages} (first {req.first[t]})")
                if len(set(pages[req.first[t]:])) != len(pages) - req.first[t]:
                    raise InvariantError(f"request {rid} table {t}: a page held twice")
                for i in range(req.first[t], len(pages)):
                    owners[spec.space][pages[i]] += 1
                    if self._spaces[spec.space].table[pages[i]] != t:
                        raise InvariantError(f"page {pages[i]} of space {spec.space} held for table {t}, marked "
                                             f"{self._spaces[spec.space].table[pages[i]]}")
                    if self._spaces[spec.space].fill[pages[i]] != min(ps, req.length - i * ps):
                        raise InvariantError(f"request {rid} table {t} page {i}: fill "
                                             f"{self._spaces[spec.space].fill[pages[i]]}")
                res[t] += self._res_of(req, t)
        if set(self._state_held) != set(self._reqs):
            raise InvariantError("state memory held by other requests than the running ones")
        for rid, held_states in self._state_held.items():
            for i, pages in enumerate(held_states):
                st = self._states[i]
                if len(pages) != st.pages or any(self._spaces[st.space].table[p] != -1 - i for p in pages):
                    raise InvariantError(f"request {rid}: state {i} holds pages {pages}")
                for p in pages:
                    owners[st.space][p] += 1
        for s, sp in enumerate(self._spaces):
            free, lru = set(sp.free), set(sp.lru)
            if len(free) != len(sp.free) or free & lru:
                raise InvariantError(f"space {s}: a page twice in the free list, or free and cached")
            for p in range(sp.num_pages):
                state = (p in free) + (p in lru) + (owners[s][p] > 0)
                if state != 1 or owners[s][p] != sp.ref[p]:
                    raise InvariantError(f"space {s} page {p}: in {state} states, ref {sp.ref[p]}, "
                                         f"{owners[s][p]} owners")
                if (p in lru) != (sp.hash[p] is not None and sp.ref[p] == 0):
                    raise InvariantError(f"space {s} page {p}: cached without a hash, or hashed and free")
                if sp.hash[p] is not None and sp.index.get(sp.hash[p]) != p:
                    raise InvariantError(f"space {s} page {p}: hash not in the index")
                if sp.ref[p] and sp.table[p] >= 0:
                    held[sp.table[p]] += 1
                    tok[sp.table[p]] += sp.fill[p]
            if len(sp.index) != sum(h is not None for h in sp.hash):
                raise InvariantError(f"space {s}: index of {len(sp.index)} entries for "
                                     f"{sum(h is not None for h in sp.hash)} hashed pages")
        cached = [0] * len(self._tables)
        for sp in self._spaces:
            for p in sp.lru:
                cached[sp.table[p]] += 1
        if (tok, held, res, cached) != (self._tok, self._held, self._reserved, self._cached):
            raise InvariantError(f"counters (token {self._tok}, held {self._held}, reserved {self._reserved}, "
                                 f"cached {self._cached}) != recount ({tok}, {held}, {res}, {cached})")
        self._check_state_sums()

    def summary(self) -> dict:
        return {**super().summary(), "prefix_caching": self.prefix_caching,
                "tables": [[self.groups[t.group].label, t.layers, t.page_size, t.space] for t in self._tables],
                "space_pages": [sp.num_pages for sp in self._spaces],
                "space_page_bytes": [sp.page_bytes for sp in self._spaces]}
