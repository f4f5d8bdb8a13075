"""Lazy registration, paged's prefix caching without hashing the pages nobody matches
(strategies/paged.py; issue 13). A mixin of `PagedStrategy`: its methods read and mutate the
strategy's page lists and hash table; it is not a strategy (no yaml registers it).

Lazy registration (prefix caching with plain LRU, no host tier, no dedup_touch, before any
fork): hashing a page costs ~1 us and most pages are never matched (the Azure traces: no hit at
all; Mooncake: a shared head, then each request's own pages), so a request that registers a
page below which nothing is registered *owns* the chain from there: that page (its node) is
registered as always, its later pages are registered without a hash (`_hash[pid]` holds the
owner; `_owners` maps the node's hash to it). The table's chains form a tree of nodes: hashed
pages, and ghosts (a chain hash whose page was evicted while pages below it stay registered, as
vLLM keeps them); `_kids` counts the nodes (and the owner) right below each node, so "nothing
registered below" is one probe. That is exact: a page below an owner's node can only be reached
through a lookup that hit that node, and nothing else is below it, so each of its pages would
have been registered (its hash new) and a lookup finds it at the owner's same position (its ids
compared as a hit's are). The first request that hits such a page, or registers a page below
the owner's node (or the first fork), makes the owner hash its pages (`_share`: then they are
nodes like any other). A page registered lazily is evicted like any other (its owner counts
them: an owner that left with none is forgotten); an owner's release moves its lazy pages by
slices (they are its own: a request that hits them has them hashed first). Every answer equals
registering every page hashed (tests/test_paged_lazy.py compares the two call by call), up to
collisions of Python's 64-bit hash, which every result here already assumes (the hash is seeded
per process).

State (set by `_init_lazy`, on with prefix caching, plain LRU, no host tier, no dedup_touch):
`_owners` maps a node's hash to the request that owns the chain below it (its pages past the
node registered unhashed: `_hash[pid]` is the owner); `_kids` counts the nodes right below each
node (hashed pages, ghosts, an owner); `_ghosts` maps a chain hash not in the table with nodes
below it to its parent hash; `_parent[pid]` is a hashed page's parent hash. `_end_lazy` (the
first fork) hashes every owner's pages and turns it off for good.

Written only where read (issue 13: overloaded Mooncake evicts 3.6M pages registered lazily):
an owner's pages registered lazily are exactly its `ndef` pages after its node (they leave the
LRU tail first, and one hit takes them all over or hashes them all), so a `_Seq` in `_hash` counts
only there; an evicted one keeps its mark, a leftover that means none (readers that meet a page
that may hold one, a running request's own or a free page, test for an int hash). A released
owner's own pages keep `_ref` 1 (a free page's is never read; its lazily registered ones read as
0 where met: `_true_refs`). `_marks` and `_true_refs` give the plain values, for checks and tests.
"""
from __future__ import annotations

import numpy as np

from kvbench.strategies._paged_state import _NEVER, _ROOT_HASH, _Match, _Seq, _page_ids, _void
from kvbench.strategies.base import InvariantError

_SEQ_FIELDS = tuple(_Seq.__dataclass_fields__)  # (a request record's fields: `_take_over` gives them to the owner's)


class LazyRegistration:
    """The lazy-registration methods of `PagedStrategy` (see the module docstring). Each says
    what it mutates; `_lazy_walk` and `_match_hashes` touch only the waiting match."""

    def _init_lazy(self, on: bool) -> None:
        """Lazy registration's state, empty; `on`: whether registration is lazy. Mutates."""
        self._lazy = on
        self._owners: dict[int, _Seq] = {}  # node hash → the request that owns the chain below it
        self._kids: dict[int, int] = {}  # chain hash → nodes right below it (hashed pages, ghosts, an owner)
        self._ghosts: dict[int, int] = {}  # chain hash not in the table with nodes below it → its parent hash
        self._parent: list[int | None] = []  # a hashed page's parent hash (lazy registration only)

    def _end_lazy(self) -> None:
        """Every owner hashes its pages, and registration hashes every page from now on (a fork:
        pages are shared, an owner's pages would not be its own). Mutates."""
        for h in list(self._owners):
            self._share(h)
        page_hashes = self._hash  # (none left registered lazily: every `_Seq` left is a leftover)
        for pid, h in enumerate(page_hashes):
            if h.__class__ is _Seq:
                page_hashes[pid] = None
        self._lazy = False
        self._kids.clear()
        self._ghosts.clear()

    def _unkid(self, h: int) -> None:
        """Node `h` has one node less right below it; a ghost left with none goes, and so on up."""
        kids, ghosts = self._kids, self._ghosts
        while True:
            left = kids[h] - 1
            if left:
                kids[h] = left
                return
            del kids[h]
            h = ghosts.pop(h, None)
            if h is None:
                return

    def _drop_lazy(self, owner: _Seq, left: int = -1) -> None:
        """A page that `owner` registered lazily is evicted (`left`: the count already taken
        down, or -1: take it down here). An owner with none left (it is released: only cached
        pages are evicted) leaves `_owners` and its node's count. Mutates."""
        if left < 0:
            owner.ndef -= 1
            left = owner.ndef
        if not left:
            key = owner.hashes[-1]
            del self._owners[key]
            self._unkid(key)

    def _true_refs(self) -> list[int]:
        """Each page's reference count: `_ref`, but 0 for a free page and for a page registered
        lazily by an owner that left (`_release_owner` leaves their `_ref` at 1). Pure; O(pages),
        for checks and tests."""
        refs = list(self._ref)
        for pid in self._free:
            refs[pid] = 0
        for o in self._owners.values():
            if o.gone:
                for pid in o.pages[len(o.hashes):len(o.hashes) + o.ndef]:
                    refs[pid] = 0
        return refs

    def _marks(self) -> list:
        """`_hash` with leftover marks (a `_Seq` on a page it does not hold registered lazily: a
        victim's mark is not cleared) read as None. Pure; O(pages), for checks and tests."""
        marks = [None if h.__class__ is _Seq else h for h in self._hash]
        for o in self._owners.values():
            for pid in o.pages[len(o.hashes):len(o.hashes) + o.ndef]:
                marks[pid] = o
        return marks

    def _lazy_walk(self, memo: _Match, owner: _Seq, i: int) -> _Match:
        """`_cached_prefix` from page i on, within the pages `owner` registered lazily (page i - 1
        is a hit: the owner's node or one of those pages): each hits where the owner has it
        registered and its ids are the request's; nothing else is below them, so the match ends
        at the first that does not. Not hashed: the match's hashes stop at the owner's first such
        page (`_match_hashes` makes the rest where needed). Mutates only the memo."""
        ps, tokens, hits, pages = self.page_size, memo.tokens, memo.hits, owner.pages
        end = min(memo.num_full, len(pages))
        if i >= end or i >= len(owner.hashes) + owner.ndef:  # (its page i is not registered lazily)
            return memo
        # its pages i..k-1 are registered: the ones that may hit. Those it registered lazily and
        # still has are its `ndef` pages after its node (a released owner's pages join the LRU tail
        # first, so they leave it tail first; a hit of one hashes or takes over them all: `_check_lazy`)
        k = min(len(owner.hashes) + owner.ndef, end)
        mine = owner.tokens
        if mine is tokens:  # the same ids all along (a preempted request back): all hit
            same = k
        elif mine.dtype == tokens.dtype:  # the first page whose ids differ, by one numpy compare (a bytes
            # slice of a long prompt costs ~1 us per KiB: a fresh buffer each)
            a, b = mine[i * ps:k * ps], tokens[i * ps:k * ps]
            if np.array_equal(a, b):
                same = k
            else:
                same = i + int(np.flatnonzero(a != b)[0]) // ps
        else:  # ids of another width: page by page, as bytes
            if owner is not memo.owner:  # (its ids as bytes, kept by the match: the owner is not changed)
                memo.owner, memo.odata = owner, owner.data if owner.data is not None else mine.tobytes()
            odata, onb, nb = memo.odata, ps * mine.itemsize, ps * tokens.itemsize
            data = memo.data
            if data is None:
                data = memo.data = tokens.tobytes()
            same = i
            while same < k and odata[same * onb:(same + 1) * onb] == data[same * nb:(same + 1) * nb]:
                same += 1
        new = pages[i:same]
        hits += new
        if owner.gone:  # (an owner's lazily registered pages are its own: ref 1 while it runs, 0 after)
            memo.cached += len(new)
        return memo

    @staticmethod
    def _match_hashes(memo: _Match, n: int, ps: int) -> list[int]:
        """The chained hashes of the match's first n pages (computed past its last computed one). Mutates only the memo."""
        hashes = memo.hashes
        if len(hashes) < n:
            data, nb = memo.data, ps * memo.tokens.itemsize
            if data is None:
                data = memo.data = memo.tokens.tobytes()
            h = hashes[-1] if hashes else _ROOT_HASH
            for i in range(len(hashes), n):
                h = hash((h, data[i * nb:(i + 1) * nb]))
                hashes.append(h)
        return hashes[:n]

    def _register_watched(self, seq: _Seq, first: int, full: int) -> None:
        """Lazy registration of pages first..full-1 of a request that owns no chain: each page
        hashed and registered as always (its node counted under its parent's; a parent whose
        nodes below are an owner's, hashed first: the owner may hold these ids), until a page
        below which nothing is registered: the request owns its chain from there, its later
        pages registered lazily. Mutates."""
        ps, hashes, pages = self.page_size, seq.hashes, seq.pages
        table, page_hashes, stored, parent = self._table, self._hash, self._stored_ids, self._parent
        kids, ghosts, owners = self._kids, self._ghosts, self._owners
        h = hashes[-1] if first else _ROOT_HASH
        for i in range(first, full):
            if h in owners:  # an owner's lazily registered page may hold these ids
                self._share(h)
            elif i and h not in kids and h not in table:  # its parent is no node: look further up
                self._above(hashes, i)
            ids = _page_ids(seq, i, ps)
            x = hash((h, ids))
            hashes.append(x)
            pid = pages[i]
            if x not in table and page_hashes[pid].__class__ is not int:  # (a `_Seq` here is a leftover: none)
                table[x] = pid
                page_hashes[pid] = x
                stored[pid] = ids
                parent[pid] = h
                if ghosts.pop(x, None) is None:  # (a ghost is counted under its parent already)
                    c = kids.get(h)
                    if c is not None:
                        kids[h] = c + 1
                    elif not i or h in table:
                        kids[h] = 1
                    else:  # its parent left the table with nothing below it: a ghost again
                        self._attach(hashes, i)
            h = x
            if x not in kids:  # nothing registered below it: the request owns its chain from here
                owners[x] = seq
                kids[x] = 1
                rest = pages[i + 1:full]
                for pid in rest:
                    page_hashes[pid] = seq
                seq.lazy, seq.ndef = True, len(rest)
                break
        seq.hash_at = (full + 1) * ps if full < seq.cache_pages else _NEVER

    def _above(self, hashes: list[int], i: int) -> None:
        """Page i of a chain is registered below a parent that is no node: the first node above
        it (or the root) is looked up, and if it is an owner's, the owner's pages are hashed
        (nothing is registered below an owner's node but its lazy pages, which these pages may
        duplicate). Mutates."""
        kids, table = self._kids, self._table
        for j in range(i - 2, -1, -1):
            h = hashes[j]
            if h in kids or h in table:
                if h in self._owners:
                    self._share(h)
                return

    def _attach(self, hashes: list[int], i: int) -> None:
        """Node `hashes[i]` was registered below a parent that is no node (its page left the
        table with nothing below it, as pages stay registered when their parent is evicted):
        the parent becomes a ghost, counted under its own parent, and so on up. Mutates."""
        kids, ghosts, table = self._kids, self._ghosts, self._table
        while True:
            i -= 1
            h = hashes[i]
            up = hashes[i - 1] if i else _ROOT_HASH
            kids[h] = 1
            ghosts[h] = up
            c = kids.get(up)
            if c is not None:
                kids[up] = c + 1
                return
            if not i or up in table:
                kids[up] = 1
                return

    def _may_take_over(self, owner: _Seq, nhit: int) -> bool:
        """Whether a request that hits the pages `owner` registered lazily up to its `nhit`-th
        page may own them in its place: the owner left, and has no page registered lazily
        past them (a preempted request that comes back hits all it had registered). Pure."""
        if not owner.gone or self._rare.admission:
            return False
        return len(owner.hashes) + owner.ndef <= nhit  # (its pages registered lazily: `_check_lazy`)

    def _take_over(self, owner: _Seq, seq: _Seq, nhit: int) -> _Seq:
        """`seq` (just admitted, its first `nhit` pages hits) owns in `owner`'s place the pages
        that owner registered lazily (all among its hits: `_may_take_over`); returns the record
        the admitted request runs with. Where its hits past the owner's node are exactly the
        owner's pages registered lazily (nhit = len(owner.hashes) + owner.ndef: a preempted
        request back, Mooncake: all of them), that record is `owner` itself, given `seq`'s
        fields: its pages are marked with it already, so none is marked again (O(1), not
        O(pages)). Exact: what marking each with `seq` gives, but for which object the marks
        and `_owners` name, and no reader tells them apart: the owner that left is read nowhere
        after (its node's owner is the new record; the waiting match, the one thing that keeps
        an owner, `_Match.owner`, was dropped by this admission); a leftover mark of it (on a
        free or held page it no longer registers) is read by none but as a leftover, by class
        or by position (`_marks`, `_check_lazy`), never compared with a live request's record.
        Mutates."""
        start = len(owner.hashes)
        if nhit == start + owner.ndef and owner.lazy:
            del seq.hashes[start:]
            for name in _SEQ_FIELDS:
                setattr(owner, name, getattr(seq, name))
            owner.lazy, owner.ndef = True, nhit - start
            return owner
        page_hashes = self._hash
        for pid in seq.pages[start:nhit]:
            page_hashes[pid] = seq
        del seq.hashes[start:]
        seq.lazy, seq.ndef = True, nhit - start
        owner.lazy, owner.ndef = False, 0
        self._owners[owner.hashes[-1]] = seq
        return seq

    def _share(self, key: int) -> None:
        """The owner of the chain below node `key` hashes the pages it registered lazily (another
        request matched them, or registers a page below `key`). Mutates."""
        owner = self._owners.pop(key)
        self._hash_owned(owner)
        self._unkid(key)  # (the owner's count: its hashed pages are counted now)

    def _hash_owned(self, owner: _Seq) -> None:
        """The pages `owner` registered lazily and still has registered get their hashes, as if
        registered hashed: none of those hashes is in the table or a ghost (nothing else is
        below the owner's node); an evicted one with a registered page below it is a ghost, as
        evicting it hashed would have left it. Mutates."""
        ps, table, page_hashes, stored = self.page_size, self._table, self._hash, self._stored_ids
        parent, kids, ghosts, ref, gone = self._parent, self._kids, self._ghosts, self._ref, owner.gone
        memo = self._hit_memo
        if memo is not None and memo.hits and page_hashes[memo.hits[-1]] is owner:  # the waiting match's hits
            memo.index.update(memo.hits[memo.nidx:])  # past its hashed ones are these pages: indexed (`_index`)
            memo.nidx = len(memo.hits)
        done = owner.cache_pages if owner.hash_at == _NEVER else owner.hash_at // ps - 1  # pages registered
        data = owner.data
        if data is None:
            data = owner.data = owner.tokens.tobytes()
        nb = ps * owner.tokens.itemsize
        hashes, start = owner.hashes, len(owner.hashes)  # (its pages from `start` on: registered lazily)
        pieces = np.frombuffer(data, _void(nb), done - start, start * nb).tolist()  # (their ids, one call)
        h = hashes[-1]
        for ids in pieces:
            h = hash((h, ids))
            hashes.append(h)
        below = False  # whether node i + 1 exists (hashed or a ghost)
        for i in range(done - 1, start - 1, -1):
            pid, h, up = owner.pages[i], hashes[i], hashes[i - 1]
            mine = i < start + owner.ndef  # (its pages registered lazily and still registered: `_check_lazy`)
            if mine:
                if table.setdefault(h, pid) != pid or h in kids:
                    raise InvariantError(f"lazy registration: page {i} of a chain's owner hashes as a registered page")
                page_hashes[pid] = h
                if gone:  # (its ref 0, implied while it was registered lazily: written now)
                    ref[pid] = 0
                stored[pid] = pieces[i - start]
                parent[pid] = up
            if below:
                kids[h] = 1
                if not mine:
                    ghosts[h] = up
            below = below or mine
        if below:
            kids[hashes[start - 1]] += 1
        owner.lazy, owner.ndef = False, 0

    def _release_owner(self, seq: _Seq) -> None:
        """`_unref_pages(reversed(seq.pages))` for a chain's owner, its lazy pages by slices: its
        pages past `done` (none registered: its own) go to the free stack, its pages from its
        node's on, up to `done` (registered lazily: its own, as a request that hits them hashes
        them first) to the LRU, tail first, then its first pages (hits or hashed) page by page.
        Its own pages keep `_ref` 1, not written (a free page's is not read; a page registered
        lazily by an owner that left has ref 0: `_true_refs`, and the few readers that meet one,
        `admit`, `_cut` and `_hash_owned`, say so). Mutates."""
        pages, ps = seq.pages, self.page_size
        done = seq.cache_pages if seq.hash_at == _NEVER else seq.hash_at // ps - 1
        start = len(seq.hashes)  # (its pages from `start` on are its own: their `_ref` stays 1, read as 0
        # from now on: see `_true_refs`)
        self._token -= seq.length - start * ps
        memo = self._hit_memo
        if memo is not None and memo.hits and self._hash[memo.hits[-1]] is seq:  # the waiting match's hits
            memo.cached += len(memo.hits) - start  # from `start` on are its lazy pages (`_index`): cached now
        self._free.fromlist(pages[:done - 1:-1])
        ref, first = self._ref, pages[0]
        if start == 1 and memo is None and ref[first] == 1 and self._hash[first].__class__ is int:
            # (its node is its own first page, hashed, and no request waits: `_unref_pages` of it,
            # inlined, the LRU a PageLRU as lazy registration needs; the Azure traces' every release)
            # it turns cached after its pages registered lazily, all in one extend
            ref[first] = 0
            self._token -= self._fill[first]
            self._lru.extend(pages[done - 1::-1])
        else:
            self._unref_pages(pages[start - 1::-1], cached=pages[done - 1:start - 1:-1])
        if not seq.ndef:  # no page registered lazily: its node needs no owner
            self._drop_lazy(seq, 0)

    def _check_lazy(self, n: int) -> None:
        """Lazy registration: the node counts (`_kids`) recounted from the hashed pages (each
        counted under its parent, whose hash with its ids gives its own), the ghosts and the
        owners; ghosts are not in the table and have nodes below them; every owner is its node's
        owner, live or with `ndef` pages registered lazily (its pages from its node's on, below
        the pages it registered; its own while it runs); and the hashes of those pages (computed
        here) are distinct and none is in the table or a ghost: hashing them all gives the table
        that registering every page hashed gives."""
        if not self._lazy:
            if self._owners or self._kids or self._ghosts:
                raise InvariantError("lazy registration off, but owners, node counts or ghosts are kept")
            return
        ps, live = self.page_size, {id(seq) for seq in self._seqs.values()}
        kids: dict[int, int] = {}
        for h, pid in self._table.items():
            up = self._parent[pid]
            if hash((up, self._stored_ids[pid])) != h:
                raise InvariantError(f"page {pid}: its parent hash and ids do not give its hash")
            kids[up] = kids.get(up, 0) + 1
        for h, up in self._ghosts.items():
            if h in self._table or not self._kids.get(h):
                raise InvariantError(f"ghost {h} is in the table or has nothing below it")
            kids[up] = kids.get(up, 0) + 1
        for h in self._owners:
            kids[h] = kids.get(h, 0) + 1
        if any(h != _ROOT_HASH and h not in self._table and h not in self._ghosts for h in kids):
            raise InvariantError("a node counted as a parent is neither in the table nor a ghost")
        if kids != self._kids:
            raise InvariantError(f"node counts {len(self._kids)} kept, {len(kids)} recounted, differ")
        seen = set(self._table) | set(self._ghosts)
        for h, o in self._owners.items():
            if not o.lazy or o.hashes[-1] != h or not (o.ndef or id(o) in live):
                raise InvariantError(f"owner of node {h}: lazy {o.lazy}, {o.ndef} pages registered lazily")
            if id(o) in live and any(self._ref[p] != 1 for p in o.pages[len(o.hashes):]):
                raise InvariantError("an owner shares a page it registered lazily")
            done = o.cache_pages if o.hash_at == _NEVER else o.hash_at // ps - 1
            x, nb = h, ps * o.tokens.itemsize
            data = o.tokens.tobytes()
            for i in range(len(o.hashes), done):
                x = hash((x, data[i * nb:(i + 1) * nb]))
                if i < len(o.hashes) + o.ndef:
                    if x in seen:
                        raise InvariantError(f"page {i} of node {h}'s owner, registered lazily, hashes as a "
                                             "registered page or a ghost")
                    seen.add(x)
        for seq in self._seqs.values():
            if seq.lazy and self._owners.get(seq.hashes[-1]) is not seq:
                raise InvariantError("a lazy request does not own its chain")
        # a released owner's pages registered lazily are its pages from its node's on, `ndef` of
        # them (they leave tail first), and one run of the LRU's order (its eviction loop takes
        # them by runs: `PagedStrategy._take_pages`)
        # (and so are a running owner's: `_lazy_walk` relies on it)
        order = {pid: at for at, pid in enumerate(self._lru)}
        for o in self._owners.values():
            start = len(o.hashes)
            mine = o.pages[start:start + o.ndef]
            if any(self._hash[pid] is not o for pid in mine):
                raise InvariantError(f"an owner's {o.ndef} pages registered lazily are not its pages "
                                     f"{start}..{start + o.ndef - 1}")
            if id(o) in live or not o.ndef:
                continue
            if any(self._ref[pid] != 1 for pid in mine):  # (`_take_pages` relies on it)
                raise InvariantError("a page registered lazily by an owner that left: its `_ref` does not read 1")
            at = sorted(order[pid] for pid in mine)
            if at[-1] - at[0] != len(at) - 1:
                raise InvariantError("a released owner's pages registered lazily are not one run of the LRU")
        # any other `_Seq` in `_hash` is a leftover (a victim's mark is not cleared: it means none), on
        # a page that is free or held and not registered (a page in the table holds its hash: checked
        # by check_invariants), never on a cached one
        valid = {pid for o in self._owners.values() for pid in o.pages[len(o.hashes):len(o.hashes) + o.ndef]}
        if any(self._hash[pid].__class__ is _Seq and pid not in valid for pid in order):
            raise InvariantError("a cached page holds a leftover mark")
