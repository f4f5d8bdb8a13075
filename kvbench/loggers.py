"""Where a finished run is reported besides its run dir (`logger=none|wandb`)."""
from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig


class NullLogger:
    """Logs nothing: the run dir is the record."""

    def log_run(self, cfg: DictConfig, summary: dict, timeline: pd.DataFrame, requests: pd.DataFrame) -> None:
        pass
