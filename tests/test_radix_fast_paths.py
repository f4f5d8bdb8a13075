"""radix's shortcuts against the long way round:
- a waiting request's retry refused at once while nothing that could change its answer has
  (`RadixStrategy._gen`, the free pages, its budget): every retry of a random run answers as a
  copy of the strategy without the memo (matched from scratch) answers;
- a node's key is a view of the request's ids where it is at least half of the array it views,
  else a copy; the tree holds the same ids either way;
- the common prefix of two keys (`_common`: a byte compare up to 4k ids, else the first
  difference by argmax) equals the first difference found id by id, in whole pages;
- the instance keeps at most 29 attributes (CPython's shared keys: a 30th makes every
  `self.x` on the hot paths a dict lookup)."""
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
