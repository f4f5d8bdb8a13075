"""`kvbench-report DIR [DIR ...]`: one tidy table and a set of figures from runs and sweeps.

    kvbench-report results/multirun/2026-11-26_06-11-11           # writes .../report/
    kvbench-report results/multirun/memory_waste --out results/memory_waste
    kvbench-report BEFORE AFTER --compare                          # every headline metric, B against A

Writes runs.csv (every summary key, one row per run), runs.md (the headline columns), the
figures (PNG), index.md, which embeds them, and index.html (the same, self-contained: figures
inside, tables sortable in a browser) into DIR/report/ (or --out). Runs that failed or never
ran are listed there; the others are reported all the same. With --compare: compare.md,
compare.csv and compare.png into AFTER/compare/ (or --out).

This module imports no plotting or table library: `kvbench-report --help` stays fast; the
work is in kvbench.report.writer and kvbench.report.compare, imported when needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def write_report(dirs: list[Path], out: Path | None = None, title: str | None = None,
                 run: str | None = None, bounds: bool = True, kernel_times: Path | None = None):
    """Collect the runs under `dirs` and write the report into `out` (default DIR/report);
    returns (out, Collection). See kvbench.report.writer.write_report."""
    from kvbench.report.writer import write_report as write

    return write(dirs, out, title, run, bounds, kernel_times)


class WriteReport(Callback):
    """Hydra callback: write the report of a sweep when it ends (experiments use it).

    `out` is where a published report goes (results/<experiment>/, committed); it is written
    there only when `publish` is true. Otherwise the report goes into the sweep folder's
    report/ (not committed), so running a documented experiment leaves the checkout clean."""

    def __init__(self, out: str | None = None, title: str | None = None, kernel_times: str | None = None,
                 publish: bool = False) -> None:
        self.out, self.title, self.publish = out, title, bool(publish)
        self.kernel_times = Path(kernel_times) if kernel_times and Path(kernel_times).exists() else None

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        out = self.out if self.publish else None
        out, col = write_report([Path(config.hydra.sweep.dir)], out, self.title, kernel_times=self.kernel_times)
        missing = f", {len(col.missing)} missing (listed there)" if col.missing else ""
        hint = "" if self.publish or not self.out else f" (publish=true writes it to {self.out})"
        print(f"kvbench-report: {len(col.table)} runs{missing} -> {out / 'index.md'}, {out / 'index.html'}{hint}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvbench-report", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="run or sweep folders (several are merged)")
    p.add_argument("--out", type=Path, help="where to write (default: the first DIR/report; with --compare AFTER/compare)")
    p.add_argument("--title", help="the title of index.md")
    p.add_argument("--run", help="the run (folder, relative to DIR) of the slot-states figure")
    p.add_argument("--no-bounds", action="store_true", help="skip the trace's hit-rate bounds")
    p.add_argument("--kernel-times", type=Path, help="bench_kernels CSV: decode time per page size")
    p.add_argument("--compare", action="store_true",
                   help="compare two run sets: the change of every headline metric from DIR A to DIR B")
    a = p.parse_args(argv)
    if a.compare and len(a.dirs) != 2:
        print("kvbench-report: error: --compare takes exactly two folders (A B)", file=sys.stderr)
        sys.exit(2)
    bad = [d for d in a.dirs if not d.is_dir()] if a.compare else ([] if any(d.is_dir() for d in a.dirs) else a.dirs)
    if bad:
        print(f"kvbench-report: error: no such folder: {', '.join(str(d) for d in bad)}", file=sys.stderr)
        sys.exit(2)
    try:
        if a.compare:
            from kvbench.report.compare import write_compare

            out, text = write_compare(a.dirs[0], a.dirs[1], a.out)
            print(text)
            print(f"kvbench-report: -> {out / 'compare.md'}")
            return
        out, col = write_report(a.dirs, a.out, a.title, a.run, not a.no_bounds, a.kernel_times)
    except KeyboardInterrupt:
        print("kvbench-report: interrupted; the earlier report (if any) is unchanged", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        print(f"kvbench-report: error: cannot write {err.filename or a.out}: {err.strerror or err}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:  # --compare: no runs, or nothing to match
        print(f"kvbench-report: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    missing = f", {len(col.missing)} missing (listed there)" if col.missing else ""
    print(f"kvbench-report: {len(col.table)} runs{missing} -> {out / 'index.md'}")


if __name__ == "__main__":
    main()
