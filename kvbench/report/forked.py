"""fork_map: a report's independent pieces (one run's files, one figure) in forked processes, one
per CPU this process may use (issue 13 §5: a sweep's report was one core's work at its end).

The children are forked, so they start with everything the caller holds (the Collection, the
imported pandas and matplotlib): only each piece's index goes in and its result (pickled) comes
back, in order. Each piece must only read shared state and write its own files. Serial, in this
process, where fork is missing, with one CPU, for one piece, or with KVBENCH_REPORT_PROCS=1.
An exception in a piece is raised here, as a serial call would raise it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

_PIECES: list[Callable[[], Any]] = []  # what the forked children run (set just before forking)


def _one(i: int) -> Any:
    return _PIECES[i]()


def _child_gc() -> None:
    """In a forked child: what it inherits is left out of the cyclic garbage collector, which
    collects less often (as the launcher's workers: matplotlib makes ~10^5 short-lived objects)."""
    import gc

    gc.freeze()
    gc.set_threshold(20000, *gc.get_threshold()[1:])


def processes() -> int:
    """How many processes a report uses: KVBENCH_REPORT_PROCS, else the CPUs this process may use."""
    env = os.environ.get("KVBENCH_REPORT_PROCS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fork_map(pieces: Sequence[Callable[[], Any]], chunk: int = 1) -> list[Any]:
    """[piece() for piece in pieces], in up to processes() forked children (`chunk` pieces per
    hand-out). Mutates nothing of the caller's but the module's piece list, for the call's span."""
    n = min(processes(), len(pieces))
    if n <= 1 or not hasattr(os, "fork"):
        return [piece() for piece in pieces]
    import multiprocessing
    import sys

    sys.stdout.flush()  # (a forked child flushes what it inherits: nothing is printed twice)
    sys.stderr.flush()
    _PIECES[:] = pieces
    try:
        with multiprocessing.get_context("fork").Pool(n, initializer=_child_gc) as pool:
            return pool.map(_one, range(len(pieces)), chunksize=max(1, chunk))
    finally:
        _PIECES.clear()
