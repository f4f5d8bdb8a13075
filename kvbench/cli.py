"""`kvbench`: the Hydra app. A thin shell around kvbench.run.run that turns errors into one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

HEADLINE = [("finished", "{:d}"), ("rejected", "{:d}"), ("preemptions", "{:d}"),
            ("request_throughput", "{:.2f}"), ("output_throughput", "{:.0f}"),
            ("ttft_p50_s", "{:.3f}"), ("tpot_p50_s", "{:.4f}"), ("mem_token_states_frac", "{:.3f}"),
            ("waste_frac", "{:.3f}"), ("prefix_hit_rate", "{:.3f}"), ("peak_running", "{:d}"),
            ("wall_time_s", "{:.1f}")]


def headline_table(summaries: list[dict]) -> str:
    """A short text table of the headline metrics, one column per run."""
    rows = [("", *[f"{s['label']} · {s['trace']}" for s in summaries])]
    for key, fmt in HEADLINE:
        rows.append((key, *["-" if s.get(key) is None else fmt.format(s[key]) for s in summaries]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _one_line(err: BaseException) -> str:
    cause = err
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    msg = str(cause) if cause is err else f"{type(cause).__name__}: {cause}"
    if isinstance(err, InstantiationException) and "full_key:" in str(err):
        msg += f" (in config '{str(err).rsplit('full_key:', 1)[1].strip()}')"
    return " ".join(msg.split())


CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from kvbench.run import run  # imported late: keeps `kvbench --help` fast
    from kvbench.traces import TraceError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, out_dir)
    except (TraceError, ValueError, FileNotFoundError, KeyError, InstantiationException,
            OmegaConfBaseException) as err:
        print(f"kvbench: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    print(headline_table([summary]))
    print(f"results: {out_dir}")


class CompareRuns(Callback):
    """After a sweep, print the headline metrics of every run side by side."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        summaries = [json.loads(p.read_text()) for p in sorted(root.glob("*/summary.json"))]
        if summaries:
            print(f"\n{len(summaries)} runs under {root}:\n{headline_table(summaries)}")


GROUPS = ("strategy", "trace", "engine", "model", "logger", "experiment")


def unknown_choice(args: list[str]) -> str | None:
    """A one-line error for `group=name` overrides that name no yaml (Hydra's own is a page)."""
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value.startswith(("choice(", "range(", "glob(")):
            continue
        folder = Path(CONFIG_DIR) / key
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        for name in filter(None, value.split(",")):
            if name not in known:
                return f"unknown {key} '{name}' in '{arg}' (choose from: {', '.join(known)})"
    return None


def main() -> None:
    from kvbench.schema import register

    if (err := unknown_choice(sys.argv[1:])) is not None:
        print(f"kvbench: error: {err}", file=sys.stderr)
        sys.exit(2)
    register()
    _app()


if __name__ == "__main__":
    main()
