"""A strategy-independent model of what every slot of the pool holds, and a driver that checks it.

The driver calls a strategy only through the contract (admit / grow / release / fork / evict /
take_copies / page_table) and plays the engine's part in a model of the pool: `slots[i]` is the
token id whose K/V slot `i` holds (-1: never written).

    admit → cached positions [0, c) must already hold tokens[0:c] (a hit serves real content);
            then positions [c, length) are computed: their ids are written at their slots
    grow  → copies from take_copies() are applied first (copy-on-write), then the new positions
            are written
    fork  → copies applied; the child reads the parent's positions
    host  → a strategy with a host tier (`take_host_copies`) has its page copies applied first, in
            order, to a model of the host pool (`host_slots`): a page evicted to the host and hit
            later must come back with its ids (a wrong page id or a missing copy shows up)
    after every call, every running request reads [0, length) through its page table and must
    find exactly its own ids there (a slot handed to two owners, a wrong hit, a copy forgotten,
    a page freed while in use: each shows up as a wrong id)

The contract says a call that answers "no" (admit not admitted, grow / fork False) changes
nothing: before every admit, grow and fork the driver fingerprints the strategy (page tables,
slot states, and a pickle of its private fields, memos excepted: fields named *memo*) and, when
the call answers no, names every field that changed. `Checked` wraps a strategy so that the
scheduler's own calls go through the driver; `random_run` is the random generator that the
property tests and the opt-in long run share.
"""
from __future__ import annotations

import io
import itertools
import pickle
from dataclasses import dataclass

import numpy as np

#: private fields that are memos of pure computations (a retry of the same call may reuse them)
MEMO_FIELDS = ("_hit_memo", "_match_memo", "_memo")


class ContentError(AssertionError):
    """A request would read a token id other than its own."""


class MutatedOnNo(AssertionError):
    """A call that answered no changed the strategy."""


@dataclass
class Live:
    tokens: np.ndarray  # all ids the request will hold
    kv_len: int
    num_prompt: int
    length: int  # positions with room (computed between calls)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, itertools.count):  # not picklable on every Python: its repr is its state
            return str, (repr(obj),)
        return NotImplemented


def _dump(value) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buf.getvalue()


def _state(strategy) -> dict:
    """Private fields, less memos and the strategy's own methods bound as fields (code, not state:
    paged binds `room` at construction; pickling one would pickle the whole strategy, memos too)."""
    return {k: v for k, v in vars(strategy).items() if k not in MEMO_FIELDS and "memo" not in k
            and getattr(v, "__self__", None) is not strategy}


def fingerprint(strategy, live: dict[int, Live]) -> tuple:
    """Everything a caller or a later call could observe: page tables, slot states and a pickle
    of the private fields. Pure."""
    waiting = max((lv.kv_len for lv in live.values()), default=None)
    tables = tuple((rid, strategy.page_table(rid).tobytes()) for rid in sorted(live))
    return tables, strategy.slot_states(None), strategy.slot_states(waiting), _dump(_state(strategy))


def changed_fields(before: tuple, strategy, live: dict[int, Live]) -> list[str]:
    """Names of what differs from the `before` fingerprint (empty: nothing). Pure."""
    after = fingerprint(strategy, live)
    names = [n for n, b, a in zip(("page tables", "slot states", "slot states"), before, after) if a != b]
    if after[3] != before[3]:
        old, new = pickle.loads(before[3]), _state(strategy)
        names += sorted(k for k in old.keys() | new.keys() if k not in old or k not in new
                        or _dump(old[k]) != _dump(new[k]))
    return sorted(set(names))


class Driver:
    """A strategy plus the model of its pool. Every verb checks content after the call.

    Args:
        strategy: a freshly built strategy (nothing admitted yet).
        check_no_mutation: fingerprint before calls that may answer no (costs a pickle per call).
        invariants: call the strategy's own check_invariants() after every call too.
    """

    def __new__(cls, strategy, *args, **kwargs):
        if cls is Driver and hasattr(strategy, "tables"):  # a hybrid pool: every page table modelled
            from hybrid_content import HybridDriver  # (tests/hybrid_content.py)
            cls = HybridDriver
        return super().__new__(cls)

    def __init__(self, strategy, check_no_mutation: bool = True, invariants: bool = True) -> None:
        self.s = strategy
        self.ps = strategy.page_size
        self.slots = np.full(strategy.capacity, -1, dtype=np.int64)
        self.host_slots = np.full(getattr(strategy, "host_tier_tokens", 0), -1, dtype=np.int64)
        self.host_hits = 0  # of `hits`, positions that came back from the host tier
        self.host_copies: list[tuple[str, int, int]] = []  # host-tier page copies applied, in order
        self.live: dict[int, Live] = {}
        self.check_no_mutation = check_no_mutation
        self.invariants = invariants
        self.hits = 0  # prompt positions served from cache, over the run
        self.refusals = 0  # calls that answered no
        self.copies: list[tuple[int, int]] = []  # copies applied since the last `Checked.take_copies`

    # ---- the model --------------------------------------------------------------------------
    def slots_of(self, rid: int, start: int, stop: int) -> np.ndarray:
        """Pool slots of positions [start, stop) of `rid`, through its page table. Pure."""
        table = self.s.page_table(rid).astype(np.int64)
        pos = np.arange(start, stop)
        if len(table) < self.s.pages_for(stop):
            raise ContentError(f"request {rid}: page table of {len(table)} pages for {stop} positions")
        return table[pos // self.ps] * self.ps + pos % self.ps

    def _apply_copies(self) -> None:
        ps = self.ps
        if len(self.host_slots):  # host moves first, in order (an evicted page is copied out before reuse)
            host_copies = self.s.take_host_copies()
            self.host_copies += host_copies
            for kind, src, dst in host_copies:
                a, b = (self.slots, self.host_slots) if kind == "d2h" else (self.host_slots, self.slots)
                b[dst * ps:(dst + 1) * ps] = a[src * ps:(src + 1) * ps]
        copies = self.s.take_copies()
        self.copies += copies
        for src, dst in copies:
            self.slots[dst * ps:(dst + 1) * ps] = self.slots[src * ps:(src + 1) * ps]

    def _write(self, rid: int, start: int, stop: int) -> None:
        if stop > start:
            self.slots[self.slots_of(rid, start, stop)] = self.live[rid].tokens[start:stop]

    def expect_holds(self, rid: int, stop: int, what: str) -> None:
        """Positions [0, stop) of `rid` hold its token ids."""
        lv = self.live[rid]
        got = self.slots[self.slots_of(rid, 0, stop)]
        bad = np.flatnonzero(got != lv.tokens[:stop])
        if len(bad):
            i = int(bad[0])
            raise ContentError(f"{self.s.label}: {what}: request {rid} position {i} holds id {got[i]}, "
                               f"expected {lv.tokens[i]} ({len(bad)} of {stop} positions wrong)")

    def check_all(self, what: str) -> None:
        for rid, lv in self.live.items():
            if len(self.s.page_table(rid)) != self.s.pages_for(lv.length):
                raise ContentError(f"{self.s.label}: {what}: request {rid} holds "
                                   f"{len(self.s.page_table(rid))} pages for {lv.length} positions")
            self.expect_holds(rid, lv.length, what)
        if self.invariants:
            self.s.check_invariants()

    def _refused(self, before, what: str) -> None:
        self.refusals += 1
        self._apply_copies()  # (must be none)
        if before is not None:
            changed = changed_fields(before, self.s, self.live)
            if changed:
                raise MutatedOnNo(f"{self.s.label}: {what} answered no but changed {', '.join(changed)}")

    # ---- the verbs --------------------------------------------------------------------------
    def admit(self, rid: int, tokens: np.ndarray, kv_len: int, num_prompt: int, max_new: int):
        before = fingerprint(self.s, self.live) if self.check_no_mutation else None
        adm = self.s.admit(rid, tokens, kv_len, num_prompt, max_new)
        what = f"admit({rid}, prompt {num_prompt}, max_new {max_new})"
        if not adm.admitted:
            self._refused(before, what)
            return adm
        c = adm.cached_tokens
        if not (0 <= c <= num_prompt - 1 and c % self.ps == 0):
            raise ContentError(f"{self.s.label}: {what}: cached_tokens {c} out of range or not whole pages")
        if c and not self.s.caches_prefixes:
            raise ContentError(f"{self.s.label}: {what}: a strategy without prefix caching answered {c} cached")
        length = c + min(max_new, num_prompt - c)
        self.live[rid] = Live(tokens, kv_len, num_prompt, length)
        self._apply_copies()
        self.expect_holds(rid, c, f"{what}: its {c} cached positions")
        self.hits += c
        h = getattr(adm, "host_tokens", 0)
        if not (0 <= h <= c and h % self.ps == 0):
            raise ContentError(f"{self.s.label}: {what}: host_tokens {h} of {c} cached, or not whole pages")
        self.host_hits += h
        self._write(rid, c, length)
        self.check_all(what)
        return adm

    def grow(self, rid: int, n: int) -> bool:
        lv = self.live[rid]
        before = fingerprint(self.s, self.live) if self.check_no_mutation else None
        what = f"grow({rid}, {n}) at length {lv.length}"
        if not self.s.grow(rid, n):
            self._refused(before, what)
            return False
        self._apply_copies()
        self._write(rid, lv.length, lv.length + n)
        lv.length += n
        self.check_all(what)
        return True

    def release(self, rid: int) -> None:
        self.s.release(rid)
        del self.live[rid]
        self._apply_copies()
        self.check_all(f"release({rid})")

    def fork(self, parent: int, child: int, child_tokens: np.ndarray, child_kv_len: int | None = None) -> bool:
        src = self.live[parent]
        kv_len = src.kv_len if child_kv_len is None else child_kv_len
        before = fingerprint(self.s, self.live) if self.check_no_mutation else None
        what = f"fork({parent} → {child})"
        if not self.s.fork(parent, child, child_tokens, kv_len):
            self._refused(before, what)
            return False
        self.live[child] = Live(child_tokens, kv_len, src.num_prompt, src.length)
        self._apply_copies()
        self.check_all(what)
        return True

    def evict(self, num_slots: int) -> int:
        freed = self.s.evict(num_slots)
        self._apply_copies()
        self.check_all(f"evict({num_slots})")
        return freed

    def release_all(self) -> None:
        """Release every running request; then nothing is held and all memory is free or cached."""
        for rid in sorted(self.live):
            self.release(rid)
        end = self.s.slot_states(None)
        assert end.token == end.reserved == end.internal == end.external == 0, end
        assert end.free + end.cached == self.s.capacity, end
        self.evict(self.s.capacity)
        assert self.s.slot_states(None).free == self.s.capacity


class Checked:
    """A strategy whose every contract call goes through a Driver: the scheduler (or anything
    else) drives it as the strategy itself, and each call's content is checked. Pure reads and
    attributes pass straight through; copies reach `take_copies` after the model applied them."""

    def __init__(self, strategy, check_no_mutation: bool = True, invariants: bool = True) -> None:
        self.driver = Driver(strategy, check_no_mutation=check_no_mutation, invariants=invariants)

    def __getattr__(self, name):
        return getattr(self.driver.s, name)

    def admit(self, rid, tokens, kv_len, num_prompt, max_new):
        return self.driver.admit(rid, tokens, kv_len, num_prompt, max_new)

    def grow(self, rid, num_tokens):
        return self.driver.grow(rid, num_tokens)

    def release(self, rid):
        self.driver.release(rid)

    def fork(self, parent, child, child_tokens, child_kv_len):
        return self.driver.fork(parent, child, child_tokens, child_kv_len)

    def evict(self, num_slots):
        return self.driver.evict(num_slots)

    def take_copies(self):
        copies, self.driver.copies = self.driver.copies, []
        return copies

    def take_host_copies(self):
        """The host-tier copies the model applied since the last call (as take_copies)."""
        copies, self.driver.host_copies = self.driver.host_copies, []
        return copies


def family_tokens(rng: np.random.Generator, vocab: int, family: int, prompt: int, output: int) -> np.ndarray:
    """Ids of one request: requests of one family share a 40-id start (a system prompt); the rest
    is random over `vocab` ids, so with a tiny vocab whole pages and first ids collide often."""
    base = np.random.default_rng(family).integers(0, vocab, 40, dtype=np.int32)
    ids = rng.integers(0, vocab, prompt + output, dtype=np.int32)
    k = min(len(base), prompt)
    ids[:k] = base[:k]
    return ids


def random_run(strategy, rng: np.random.Generator, num_ops: int, vocab: int = 2, families: int = 3,
               check_no_mutation: bool = True) -> Driver:
    """`num_ops` random calls (admit, grow, release, fork, evict) through a Driver, then release
    everything. Request sizes scale with the pool and max_model_len. As the scheduler does, a
    refused request waits and is retried under its id (the strategy may keep a memo for it), and
    a release may be a preemption: the request waits to recompute its prompt plus its outputs.
    Returns the driver."""
    d = Driver(strategy, check_no_mutation=check_no_mutation)
    s, next_id = strategy, 0
    waiting: list[tuple[int, np.ndarray, int, int]] = []  # (rid, tokens, kv_len, num_prompt), head first
    longest = min(s.max_model_len, s.capacity) - 1
    for _ in range(num_ops):
        r = rng.random()
        if r < 0.3 or not d.live:
            if waiting and rng.random() < 0.8:  # the head of the queue again
                rid, tokens, kv_len, num_prompt = waiting[0]
                if d.admit(rid, tokens, kv_len, num_prompt, int(rng.integers(1, num_prompt + 1))).admitted:
                    waiting.pop(0)
                continue
            prompt = int(rng.integers(2, max(3, longest)))
            output = int(rng.integers(1, max(2, longest - prompt + 1)))
            kv_len = prompt + output - 1
            if s.never_fits(kv_len):
                continue
            tokens = family_tokens(rng, vocab, int(rng.integers(families)), prompt, output)
            if not d.admit(next_id, tokens, kv_len, prompt, int(rng.integers(1, prompt + 1))).admitted:
                waiting.append((next_id, tokens, kv_len, prompt))
            next_id += 1
            continue
        rid = list(d.live)[int(rng.integers(len(d.live)))]
        lv = d.live[rid]
        if r < 0.7:
            n = min(int(rng.integers(1, 2 * s.page_size + 3)), lv.kv_len - lv.length)
            if n:
                d.grow(rid, n)
        elif r < 0.85:
            d.release(rid)
            if rng.random() < 0.4 and lv.length < lv.kv_len:  # preempted: recompute what it had
                waiting.insert(0, (rid, lv.tokens, lv.kv_len, max(lv.num_prompt, lv.length)))
        elif r < 0.92:
            child = lv.tokens.copy()
            child[lv.length:] = rng.integers(0, vocab, len(child) - lv.length)
            if d.fork(rid, next_id, child):
                next_id += 1
        else:
            d.evict(int(rng.integers(1, s.capacity // 2 + 2)))
    d.release_all()
    return d
