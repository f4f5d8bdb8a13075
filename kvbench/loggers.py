"""Where a finished run is reported besides its run dir (`logger=none|wandb`)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf


class NullLogger:
    """Logs nothing: the run dir is the record."""

    def log_run(self, cfg: DictConfig, summary: dict, timeline: pd.DataFrame, requests: pd.DataFrame) -> None:
        pass


class WandbLogger:
    """Logs a run to Weights & Biases: the resolved config, summary.json as the run summary, and
    the timeline (time-weighted means over at most `timeline_points` bins) as charts over
    `t_s` and as a table.

    mode: online | offline | disabled; null = $WANDB_MODE, else online when $WANDB_API_KEY is
    set and offline when not (offline runs land in `dir`/wandb; `wandb sync` uploads them).
    wandb is imported only here, so every other logger works without it.
    """

    def __init__(self, project: str = "kvbench", entity: str | None = None, mode: str | None = None,
                 dir: str | None = None, tags: list[str] | None = None, timeline_points: int = 1000) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("logger=wandb needs the wandb package: pip install 'kvbench[wandb]' "
                              "(or use logger=none)") from None
        self._wandb = wandb
        self.project, self.entity, self.tags = project, entity, list(tags or [])
        self.mode = mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.dir = dir
        self.timeline_points = int(timeline_points)

    def _names(self, summary: dict) -> tuple[str, str | None]:
        """(run name, group): the run dir's name and, in a sweep, the sweep dir's name."""
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            out = Path(HydraConfig.get().runtime.output_dir)
            multirun = HydraConfig.get().mode is not None and HydraConfig.get().mode.name == "MULTIRUN"
            return out.name, out.parent.name if multirun else None
        return f"{summary.get('label')}_{summary.get('trace')}", None

    def log_run(self, cfg: DictConfig, summary: dict, timeline: pd.DataFrame, requests: pd.DataFrame) -> None:
        from kvbench.report.collect import bin_timeline

        name, group = self._names(summary)
        if self.dir:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
        run = self._wandb.init(project=self.project, entity=self.entity, name=name, group=group,
                               tags=self.tags, dir=self.dir, mode=self.mode,
                               config=OmegaConf.to_container(cfg, resolve=True))
        try:
            binned = bin_timeline(timeline, int(summary["kv_capacity_tokens"]), self.timeline_points)
            run.define_metric("t_s")
            run.define_metric("timeline/*", step_metric="t_s")
            for row in binned.itertuples(index=False):
                run.log({"t_s": row.t_s, **{f"timeline/{k}": v for k, v in row._asdict().items() if k != "t_s"}})
            run.log({"timeline_table": self._wandb.Table(dataframe=binned)})
            run.summary.update({k: v for k, v in summary.items() if v is not None})
        finally:
            run.finish()
