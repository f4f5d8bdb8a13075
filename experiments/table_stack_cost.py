#!/usr/bin/env python3
"""Host cost of a decode step's page tables: the strategy's `page_table` of each row (the
scheduler asks for them every step an engine needs the layout) and their stacking (the gpu
engine's `_flatten_decode`: `torch_engine._stack_tables`), on the decode batches of
gpu_strategies' offline Azure config (the first 300 conversation requests at once, 131,072
slots, the 1B H200 cost model), replayed in the simulation with page tables. Per strategy: every
decode step's rows asked for, then stacked by the masked fill (the code before session 34, kept
here as the baseline) and by `_stack_tables`, each the fastest of REPEAT back-to-back timings on
this CPU (a row's table is asked for once a step in a run: the repeats hit what the strategy
keeps between a request's calls, which a run does too while the request's pages are the same).

Why: at 314933d on an H200, radix-1's decode steps of 120-130 rows took 4.33 ms against
paged-16's 3.61 ms at the same K/V read (results/gpu_strategies/h200_314933d/). Pages of 1
give rows of ~1,000 entries of different lengths, which the masked fill handled at a few ns per
entry.

    python experiments/table_stack_cost.py [--strategies radix,paged]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import REPO, use_checkout  # noqa: E402  (experiments/checkout.py)

use_checkout()

from kvbench.engines import torch_engine  # noqa: E402
from kvbench.engines.sim import SimEngine  # noqa: E402
from kvbench.replay import replay  # noqa: E402
from kvbench.run import strategy_sizes  # noqa: E402
from kvbench.scheduler import Scheduler  # noqa: E402
from kvbench.schema import register  # noqa: E402

OVERRIDES = ["trace=azure_conv", "trace.limit=300", "trace.rate=inf", "kv_capacity_tokens=131072",
             "engine=sim_h200_llama3_2_1b", "progress=false"]


def masked(pts: list) -> np.ndarray:
    """`_stack_tables` before session 34: ragged rows through one boolean mask."""
    lens = list(map(len, pts))
    width = lens[0]
    if lens.count(width) == len(lens):
        return np.concatenate(pts).astype(np.int32, copy=False).reshape(len(pts), width)
    lens = np.array(lens, np.int64)
    table = np.zeros((len(pts), int(lens.max())), np.int32)
    table[np.arange(table.shape[1]) < lens[:, None]] = np.concatenate(pts)
    return table


REPEAT = 5


class Probe(SimEngine):
    """The sim engine, asking for page tables, timing the strategy's `page_table` calls of each
    decode step and both stackings of them."""
    needs_layout = True
    times: dict
    strategy: object

    def step(self, batch) -> float:
        if batch.decode_only:
            rids, page_table = [s.request.id for s in batch.seqs], self.strategy.page_table
            best = [1.0] * 3
            for _ in range(REPEAT):
                t0 = time.perf_counter()
                pts = [page_table(r) for r in rids]
                best[0] = min(best[0], time.perf_counter() - t0)
                for i, f in ((1, masked), (2, torch_engine._stack_tables)):
                    t0 = time.perf_counter()
                    f(pts)
                    best[i] = min(best[i], time.perf_counter() - t0)
            for name, t in zip(("tables", "masked", "rows"), best):
                self.times[name].append(t)
            self.times["batch"].append(len(rids))
        return super().step(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default="radix,paged")
    args = ap.parse_args()
    known = sorted(f.stem for f in (REPO / "configs" / "strategy").glob("*.yaml"))
    bad = sorted(set(args.strategies.split(",")) - set(known))
    if bad:
        ap.error(f"unknown --strategies {bad}; known: {', '.join(known)}")
    register()
    for strategy in args.strategies.split(","):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=[f"strategy={strategy}", *OVERRIDES])
        engine = instantiate(cfg.engine)
        engine.__class__ = Probe
        engine.times = {"tables": [], "masked": [], "rows": [], "batch": []}
        st = engine.strategy = instantiate(cfg.strategy, _partial_=True)(capacity_tokens=cfg.kv_capacity_tokens,
                                                       max_model_len=cfg.max_model_len,
                                                       **strategy_sizes(cfg, cfg.kv_capacity_tokens))
        replay(list(instantiate(cfg.trace)), Scheduler(st, **cfg.scheduler), engine, progress=False)
        t = {k: np.array(v) for k, v in engine.times.items()}
        print(f"{strategy} (pages of {st.page_size}): {len(t['batch'])} decode steps, median {np.median(t['batch']):.0f} "
              f"rows; page_table calls median {np.median(t['tables']) * 1e6:.0f} us; stacking median masked "
              f"{np.median(t['masked']) * 1e6:.0f} us, _stack_tables {np.median(t['rows']) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
