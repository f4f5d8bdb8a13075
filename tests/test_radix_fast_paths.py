"""radix's shortcuts against the long way round:
- a waiting request's retry refused at once while nothing that could change its answer has
  (`RadixStrategy._gen`, the free pages, its budget): every retry of a random run answers as a
  copy of the strategy without the memo (matched from scratch) answers;
- a node's key is a view of the request's ids where it is at least half of the array it views,
  else a copy; the tree holds the same ids either way;
- the common prefix of two keys (`_common`: a byte compare up to 4k ids, else the first
  difference by argmax) equals the first difference found id by id, in whole pages;
- the instance keeps at most 29 attributes (CPython's shared keys: a 30th makes every
  `self.x` on the hot paths a dict lookup);
- an insert that only adds a leaf (in one step) and a release's insert + unlock (in one walk)
  leave the pool, page for page and in eviction order, as the node-by-node walk and a release
  that inserts, then unlocks."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from kvbench.strategies.radix import RadixStrategy


def reference_admit(st: RadixStrategy, rid, tokens, kv_len, num_prompt, max_new):
    """`admit` on a copy of `st` without the waiting request's memo: matched from scratch."""
    ref = copy.deepcopy(st)
    ref._match_memo = None
    return ref.admit(rid, tokens, kv_len, num_prompt, max_new)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("page_size", [1, 4])
def test_every_retry_answers_as_a_match_from_scratch(seed, page_size):
    """Requests sharing a few prefixes in a pool too small for all of them; the head of the
    queue is retried after every step (with a budget that varies, as the scheduler's token
    budget does), while others grow, finish, get preempted, insert and evict. Each answer of
    the head equals the answer of a copy without the memo, and some retries take the fast
    refusal (no walk of the kept match)."""
    rng = np.random.default_rng(seed)
    st = RadixStrategy(capacity_tokens=160, max_model_len=160, page_size=page_size)
    prefixes = [rng.integers(0, 9, int(rng.integers(8, 40))).astype(np.int32) for _ in range(3)]
    queue, running, rid = [], {}, 0
    walks, fast = [0], 0
    kept = st._match_kept

    def counted(memo):
        walks[0] += 1
        return kept(memo)
    st._match_kept = counted
    for step in range(400):
        if len(queue) < 3:
            prompt = np.concatenate([prefixes[rid % 3], rng.integers(0, 9, int(rng.integers(4, 30))).astype(np.int32)])
            out = rng.integers(0, 9, int(rng.integers(4, 40))).astype(np.int32)
            queue.append((rid, np.concatenate([prompt, out]), len(prompt)))
            rid += 1
        r, tokens, num_prompt = queue[0]
        kv_len = len(tokens) - 1
        max_new = int(rng.choice([num_prompt, num_prompt, 8, 64]))  # (a budget that sometimes shrinks)
        retry, before = st._match_memo is not None and st._match_memo.rid == r, walks[0]
        want = reference_admit(st, r, tokens, kv_len, num_prompt, max_new)
        got = st.admit(r, tokens, kv_len, num_prompt, max_new)
        assert got == want, f"step {step}: request {r} answered {got}, from scratch {want}"
        fast += retry and walks[0] == before
        if got.admitted:
            queue.pop(0)
            running[r] = (tokens, num_prompt)
        for q, (toks, n) in list(running.items()):  # a step: a chunk of its prompt or a decode, or it leaves
            seq = st._seqs[q]
            if seq.length >= len(toks) - 1 or rng.random() < 0.05:
                st.release(q)  # finished
                del running[q]
            elif not st.grow(q, min(len(toks) - 1 - seq.length, 1 if seq.length >= n else 16)):
                st.release(q)  # preempted: it waits again (last), to recompute
                del running[q]
                queue.append((q, toks, n))
        st.check_invariants()
    assert fast > 0, "no retry took the fast refusal"


def admitted_and_inserted(st: RadixStrategy, rid: int, tokens: np.ndarray, num_prompt: int) -> None:
    assert st.admit(rid, tokens, len(tokens) - 1, num_prompt, num_prompt).admitted
    assert st.grow(rid, 1)  # the first decode: the prompt goes into the tree


def test_long_keys_view_the_ids_and_short_ones_copy_them():
    st = RadixStrategy(capacity_tokens=1024, max_model_len=1024)
    tokens = np.arange(100, dtype=np.int32)
    admitted_and_inserted(st, 0, tokens, 81)  # its 81 prompt positions inserted: at least half of 100
    (leaf,) = st.root.children.values()
    assert np.shares_memory(leaf.key, tokens) and leaf.key.tolist() == list(range(81))
    st.release(0)  # the output so far (1 more position): a copy
    (out,) = leaf.children.values()
    assert not np.shares_memory(out.key, tokens) and out.key.tolist() == [81]
    big = np.arange(1000, 1400, dtype=np.int32)
    view = big[:100]  # a view of a 4x longer array: its key is copied
    admitted_and_inserted(st, 1, view, 81)
    node = st.root.children[1000]
    assert not np.shares_memory(node.key, big) and node.key.tolist() == list(range(1000, 1081))
    st.check_invariants()


def test_an_insert_keeps_the_request_pages():
    """The prompt's pages move to its new leaf (the private array itself) in the same order."""
    st = RadixStrategy(capacity_tokens=512, max_model_len=512)
    tokens = np.arange(300, dtype=np.int32) % 50
    assert st.admit(0, tokens, 299, 200, 200).admitted
    before = st.page_table(0).tolist()
    assert st.grow(0, 1)
    after = st.page_table(0).tolist()
    assert after[:200] == before and len(after) == 201
    (leaf,) = st.root.children.values()
    assert leaf.pages.tolist() == before
    st.check_invariants()


@pytest.mark.parametrize("kw", [{}, {"host_tier_tokens": 256, "eviction": "lfu", "cache_outputs": False,
                                    "min_cache_len": 4, "prefix_visibility": "scheduled", "page_size": 4}])
def test_attributes_stay_in_cpythons_shared_keys(kw):
    st = RadixStrategy(capacity_tokens=1024, max_model_len=1024, **kw)
    n = len(vars(st))
    assert n <= 29, (f"RadixStrategy has {n} instance attributes: past 29, CPython 3.11 keeps them in a "
                     f"dict and every self.x on the hot paths is a lookup (~100 instructions more); "
                     f"keep rarely read ones in _Options")
    for key, value in kw.items():
        assert getattr(st, key) == value


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_common_prefix_is_the_first_difference_in_whole_pages(page_size):
    """Lengths on both sides of the byte-compare bound (4,096 ids), equal and unequal lengths,
    a difference at the first id, inside, at the last id, or none."""
    st = RadixStrategy(capacity_tokens=1 << 16, max_model_len=1 << 16, page_size=page_size)
    rng = np.random.default_rng(page_size)
    for n in (0, 1, 15, 16, 17, 4095, 4096, 4097, 9000):
        a = rng.integers(0, 1000, n).astype(np.int32)
        for extra in (0, 5):
            b = np.concatenate([a, rng.integers(0, 1000, extra).astype(np.int32)])
            for at in sorted({0, n // 2, n - 1}) if n else [None]:
                c = b.copy()
                if at is not None:
                    c[at] = -1
                want = next((i for i in range(n) if a[i] != c[i]), n)
                want -= want % page_size
                assert st._common(a, c) == want == st._common(c, a), (n, extra, at)
            assert st._common(a, b) == n - n % page_size


def pool_state(st: RadixStrategy) -> tuple:
    """Everything of a radix pool that a later call could observe: the tree (each node's ids,
    pages, lock and access time, by its path), the requests (lengths, pages, deepest node), the
    eviction order (a copy of the policy emptied victim by victim), the free stack, fresh ids,
    counters, generation, clock and slot states. Pure."""
    nodes, stack = [], [(st.root, ())]
    while stack:
        node, path = stack.pop()
        pages = None if node.pages is None else node.pages.tolist()
        host = st._host_pages[node].tolist() if node in st._host_pages else None
        nodes.append((path, node.key.tolist(), pages, host, node.lock, node.access))
        stack += [(node.children[k], path + (k,)) for k in sorted(node.children, key=repr)]
    seqs = sorted((rid, s.length, s.tree_len, s.reserved, s.private.tolist(), s.node.key.tolist(), s.node.access)
                  for rid, s in st._seqs.items())
    policy, order = copy.deepcopy(st._leaves), []
    while len(policy):
        victim = policy.victim()
        order.append((victim.key.tolist(), victim.access))
    return (sorted(nodes), seqs, order, st._free.tolist(), st._fresh, st._protected, st._evictable,
            st._private_token, st._reserved, st._gen, repr(st._clock), st.slot_states(None), st.host_states())


def release_long_way(st: RadixStrategy, rid) -> None:
    """`release` as insert-then-unlock, the insert walked node by node (`_insert_walk`)."""
    seq, ps = st._seqs[rid], st.page_size
    if st._tracks:
        st._leaves.releasing(rid)
    done = min(seq.length, seq.cache_len) // ps * ps
    if done > seq.tree_len:
        st._insert_walk(seq, done)
    del st._seqs[rid]
    st._free.extend(seq.private)
    st._private_token -= seq.length - seq.tree_len
    st._reserved -= seq.reserved
    st._unlock(seq.node)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kw", [{"page_size": 1}, {"page_size": 4}, {"page_size": 1, "host_tier_tokens": 64},
                                {"page_size": 2, "cache_outputs": False}])
def test_one_step_inserts_and_releases_leave_the_pool_as_the_walk(seed, kw):
    """`_insert`'s one-step leaf and `release`'s one-walk insert + unlock against the long way
    (a copy of the pool whose inserts walk node by node and whose releases insert, then unlock):
    after every step of a random run (prompts sharing prefixes, so some inserts split and
    deduplicate, in a pool small enough to evict), both pools are the same, page for page and in
    eviction order; both paths are taken."""
    rng = np.random.default_rng(seed)
    st = RadixStrategy(capacity_tokens=192, max_model_len=192, **kw)
    ref = copy.deepcopy(st)
    ref._insert = ref._insert_walk  # (an instance attribute: every insert of the copy walks)
    calls = {"insert": 0, "walk": 0}  # st's inserts, and those that walked
    insert, walk = st._insert, st._insert_walk

    def counted(name, f):
        def call(seq, n):
            calls[name] += 1
            f(seq, n)
        return call
    st._insert, st._insert_walk = counted("insert", insert), counted("walk", walk)
    prefixes = [rng.integers(0, 9, int(rng.integers(4, 30))).astype(np.int32) for _ in range(3)]
    queue, running, rid, one_walk = [], {}, 0, 0
    for step in range(150):
        if len(queue) < 3:
            prompt = np.concatenate([prefixes[rid % 3], rng.integers(0, 9, int(rng.integers(2, 20))).astype(np.int32)])
            queue.append((rid, np.concatenate([prompt, rng.integers(0, 9, int(rng.integers(2, 30))).astype(np.int32)]),
                          len(prompt)))
            rid += 1
        r, tokens, num_prompt = queue[0]
        args = (r, tokens, len(tokens) - 1, num_prompt, int(rng.choice([num_prompt, 8])))
        got = st.admit(*args)
        assert ref.admit(*args) == got
        if got.admitted:
            queue.pop(0)
            running[r] = (tokens, num_prompt)
        for q, (toks, n) in list(running.items()):
            seq = st._seqs[q]
            grow = min(len(toks) - 1 - seq.length, 1 if seq.length >= n else 8)
            if seq.length < len(toks) - 1 and rng.random() >= 0.05:
                ok = st.grow(q, grow)
                assert ref.grow(q, grow) == ok
                if ok:
                    continue
                queue.append((q, toks, n))  # preempted: it waits again
            pending, before = min(seq.length, seq.cache_len) // st.page_size * st.page_size > seq.tree_len, dict(calls)
            st.release(q)
            release_long_way(ref, q)
            del running[q]
            one_walk += pending and calls == before
        assert pool_state(st) == pool_state(ref), f"step {step}"
        st.check_invariants()
    assert calls["walk"] > 0 and calls["insert"] > calls["walk"] and one_walk > 0, (calls, one_walk)
