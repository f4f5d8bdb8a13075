"""The per-group timeline of a hybrid pool run: `groups_timeline.parquet` and summary keys.

kvbench.run drives a hybrid strategy through `GroupLog`, which the scheduler takes for the
strategy itself: on each `slot_states` call (one per step: the scheduler's step event; the sim's
fast-forward is off for hybrid strategies) it also keeps the step's `group_slot_states`. After
the replay, `group_table` joins them with the timeline's step durations:

    groups_timeline.parquet: step (row of timeline.parquet), t_s, dt_s, group (a layer group's
    label, or "(pool)"), token, reserved, internal, external, cached, out_of_window, free [bytes]

and `group_summary` gives, per group, the time-weighted mean fraction of the pool's bytes in each
state (`mem_group_<label>_<state>_frac`; "(pool)" is named `pool`) and `mem_out_of_window_frac`
(all groups). The six summed states of summary.json come from `slot_states` as for any strategy.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from kvbench.strategies.hybrid.base import GROUP_STATES, POOL, GroupSlotStates


class GroupLog:
    """`strategy` for the scheduler, keeping each step's group slot states (mutates `rows` on
    `slot_states`: not pure, so only kvbench.run uses it). Every other name is the strategy's."""

    def __init__(self, strategy) -> None:
        self.__dict__["_s"] = strategy
        self.__dict__["rows"] = []

    def __getattr__(self, name):
        return getattr(self._s, name)

    def slot_states(self, waiting_kv_len):
        groups = self._s.group_slot_states(waiting_kv_len)
        self.rows.append(groups)
        return self._s.units(groups)


def group_table(rows: list[dict[str, GroupSlotStates]], t_s: np.ndarray, dt_s: np.ndarray) -> pd.DataFrame:
    """Long table: one row per step and group (see the module docstring). Pure."""
    if len(rows) != len(dt_s):
        raise RuntimeError(f"per-group timeline: {len(rows)} steps of group states for {len(dt_s)} timeline rows")
    labels = list(rows[0]) if rows else []
    recs = [(i, t_s[i], dt_s[i], label, *row[label]) for i, row in enumerate(rows) for label in labels]
    return pd.DataFrame.from_records(recs, columns=["step", "t_s", "dt_s", "group", *GROUP_STATES])


def group_summary(df: pd.DataFrame, pool_bytes: int) -> dict:
    """Time-weighted mean fraction of the pool's bytes per group and state. Pure."""
    out: dict = {}
    if df.empty:
        return out
    wsum = float(df[df.group == df.group.iloc[0]].dt_s.sum()) or 1.0
    for label, part in df.groupby("group", sort=False):
        w = part.dt_s.to_numpy()
        name = "pool" if label == POOL else str(label)
        for state in GROUP_STATES:
            out[f"mem_group_{name}_{state}_frac"] = float((part[state].to_numpy() * w).sum() / wsum / pool_bytes)
    per_step = df.groupby("step", sort=True).agg(oow=("out_of_window", "sum"), dt=("dt_s", "first"))
    out["mem_out_of_window_frac"] = float((per_step.oow * per_step.dt).sum() / wsum / pool_bytes)
    return out
