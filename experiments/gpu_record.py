#!/usr/bin/env python3
"""GPU benchmarks in the record: one JSON per device under results/gpu/, and the README table
generated from those files, so the numbers quoted are the numbers measured.

    python experiments/gpu_record.py run               # on a GPU machine: both benchmarks → results/gpu/<device>.json
    python experiments/gpu_record.py collect --kernels-csv K.csv --model-json M.json   # outputs made elsewhere
    python experiments/gpu_record.py table             # README.md table from results/gpu/*.json
    python experiments/gpu_record.py table --check     # exit 1 if the README table is stale (CI)

`run` invokes `experiments/bench_kernels.py --out <tmp>` and `experiments/check_model_gpu.py
--out <tmp>` (extra arguments in `--kernels-args="..."` / `--model-args="..."`), then does what `collect`
does: merges `kernels_<device>.csv` and `check_model_gpu.json` into one record, written to
`<out>/<device-slug>.json` (e.g. results/gpu/nvidia-h200.json) with the two logs beside it.

Inputs expected (what the two scripts write today):
- kernels CSV: a header row with at least `device, kernel, impl, median_ms`; also read when
  present: `date, shape, dtype, page_size, config, gbps, tflops, ratio_to_copy, vs_sdpa,
  correct, note`. Empty cells are missing values; numeric cells become numbers. All rows
  name the same device.
- model JSON: an object with `device` (str); read when present: `date, torch, triton,
  transformers, d2d_copy_bandwidth_bytes_per_s, llama3_1_8b_sizing.kv_capacity_tokens,
  llama3_1_8b_prefill_2048.{step_ms, tflops}, llama3_1_8b_decode[] {batch, context, layout,
  cuda_graphs, step_ms, frac_of_roofline, tokens_per_s}, correctness_<model>_<dtype>.{triton,
  reference}.{rel_err_vs_hf, top1_agree_vs_hf}, engine_summary_8b.peak_gpu_mem_bytes, errors`.
  Anything else is kept in the record but not tabled.

Record schema (`kvbench-gpu-record/1`), one file per device:
    {"schema": "kvbench-gpu-record/1", "device": str, "slug": str, "recorded": "YYYY-MM-DD HH:MM UTC",
     "measured": str | null (the inputs' date), "software": {"torch": str, "triton": str,
     "transformers": str}, "commit": str | null (the checkout measured: `run` asks git; `collect --commit`),
     "runs": [{"script": str, "argv": [str], "returncode": int, "wall_s": float}],
     "kernels": [{<CSV columns>}], "model": {<check_model_gpu.json>} | null}
`table` reads only files of this schema (raw outputs in results/gpu/ are ignored) and replaces
the text between `<!-- gpu-table:begin -->` and `<!-- gpu-table:end -->` in the README.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kvbench.provenance import git_commit  # noqa: E402  (the experiments import it from here)
SCHEMA = "kvbench-gpu-record/1"
BEGIN, END = "<!-- gpu-table:begin -->", "<!-- gpu-table:end -->"
MISSING = "–"


class RecordError(Exception):
    """An input or record that does not have the expected shape (the message says which)."""


def slug(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    if not s:
        raise RecordError(f"device name {device!r} gives an empty file name")
    return s


# ---- reading the two scripts' outputs -----------------------------------------------------------
def _number(text: str) -> object:
    text = text.strip()
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and re.fullmatch(r"-?\d+", text) else value


def read_kernels_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"device", "kernel", "impl", "median_ms"} - set(reader.fieldnames or [])
        if missing:
            raise RecordError(f"{path}: kernel CSV lacks columns {sorted(missing)} (header: {reader.fieldnames})")
        rows = [{k: _number(v or "") for k, v in row.items() if k is not None} for row in reader]
    devices = {str(r["device"]) for r in rows}
    if len(devices) > 1:
        raise RecordError(f"{path}: rows of several devices {sorted(devices)}; one file per device")
    return rows


def read_model_json(path: Path) -> dict:
    model = json.loads(Path(path).read_text())
    if not isinstance(model, dict) or not isinstance(model.get("device"), str):
        raise RecordError(f"{path}: expected a JSON object with a 'device' string")
    return model


def make_record(kernels: list[dict], model: dict | None, runs: list[dict], now: datetime.datetime,
                commit: str | None) -> dict:
    devices = {str(r["device"]) for r in kernels} | ({model["device"]} if model else set())
    if len(devices) != 1:
        raise RecordError(f"the kernel rows and the model results name different devices: {sorted(devices)}"
                          if devices else "nothing to record: no kernel rows and no model results")
    device = devices.pop()
    software = {k: (model or {}).get(k) for k in ("torch", "triton", "transformers")}
    measured = (model or {}).get("date") or next((str(r["date"]) for r in kernels if r.get("date")), None)
    return {"schema": SCHEMA, "device": device, "slug": slug(device), "recorded": f"{now:%Y-%m-%d %H:%M} UTC",
            "measured": measured,
            "software": software, "commit": commit, "runs": runs, "kernels": kernels, "model": model}


def write_record(record: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['slug']}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    return path


# ---- run ----------------------------------------------------------------------------------------
def _run_script(script: str, out_dir: Path, extra: list[str], log: Path) -> dict:
    argv = [sys.executable, str(REPO / "experiments" / script), "--out", str(out_dir), *extra]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    print(f"{script}: exit {rc} after {wall:.0f} s (log: {log})")
    return {"script": script, "argv": argv[1:], "returncode": rc, "wall_s": round(wall, 1)}


def cmd_run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_record-") as tmp:
        tmp = Path(tmp)
        runs, kernels, model = [], [], None
        if not args.skip_kernels:
            runs.append(_run_script("bench_kernels.py", tmp / "kernels", args.kernels_args, out / "bench_kernels.log"))
            csvs = sorted((tmp / "kernels").glob("kernels_*.csv"))
            if len(csvs) != 1:
                print(f"bench_kernels.py wrote {len(csvs)} kernels_*.csv files (expected 1): see the log",
                      file=sys.stderr)
            kernels = read_kernels_csv(csvs[0]) if csvs else []
        if not args.skip_model:
            runs.append(_run_script("check_model_gpu.py", tmp / "model", args.model_args, out / "check_model_gpu.log"))
            path = tmp / "model" / "check_model_gpu.json"
            model = read_model_json(path) if path.exists() else None
        record = make_record(kernels, model, runs, datetime.datetime.now(datetime.timezone.utc), git_commit())
    path = write_record(record, out)
    for name in ("bench_kernels.log", "check_model_gpu.log"):
        if (out / name).exists():
            (out / name).replace(out / f"{record['slug']}.{name}")
    print(f"wrote {path}")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


def cmd_collect(args) -> int:
    kernels = read_kernels_csv(Path(args.kernels_csv)) if args.kernels_csv else []
    model = read_model_json(Path(args.model_json)) if args.model_json else None
    runs = [{"script": "collect", "argv": [str(p) for p in (args.kernels_csv, args.model_json) if p],
             "returncode": 0, "wall_s": None}]
    record = make_record(kernels, model, runs, datetime.datetime.now(datetime.timezone.utc), args.commit)
    print(f"wrote {write_record(record, Path(args.out))}")
    return 0


# ---- table --------------------------------------------------------------------------------------
def load_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            records.append(data)
    return sorted(records, key=lambda r: r["device"])


def _f(x, fmt: str) -> str | None:
    return None if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, fmt)


def _join(*parts: str | None) -> str:
    text = " · ".join(p for p in parts if p)
    return text or MISSING


def kernel_rows(record: dict) -> dict[str, str]:
    rows = {}
    for r in record.get("kernels") or []:
        if r.get("kernel") == "copy":
            continue  # tabled as the copy bandwidth
        page = r.get("page_size")
        impl = r.get("impl")
        if "variant" in str(impl):  # several rows of one impl that differ only in launch config
            impl = f"{impl} {r.get('config')}"
        label = " · ".join(str(x) for x in (r.get("kernel"), impl,
                                            f"p={page}" if page not in (None, "") else None,
                                            r.get("shape")) if x not in (None, ""))
        ratio = r.get("ratio_to_copy")
        rows[f"kernel: {label}"] = _join(
            _f(r.get("median_ms"), ".4g") and f"{_f(r.get('median_ms'), '.4g')} ms",
            _f(ratio * 100 if isinstance(ratio, (int, float)) else None, ".0f") and f"{ratio * 100:.0f} % of copy",
            _f(r.get("tflops"), ".0f") and f"{r['tflops']:.0f} TFLOP/s",
            _f(r.get("vs_sdpa"), ".2f") and f"{r['vs_sdpa']:.2f}× SDPA speed",
            "FAILED CHECK" if str(r.get("correct", "")).upper() == "FAIL" else None,
            str(r["note"]) if r.get("note") and (r.get("median_ms") is None or "fail" in str(r["note"])) else None)
    return rows


def roofline_fractions(m: dict, d: dict) -> tuple:
    """(engine step, graph replay) as fractions of the roofline (weight bytes a step reads + K/V
    bytes read) / copy bandwidth, recomputed from the measured times when the sizing gives the
    bytes a step reads (records made before `step_weight_bytes` existed counted the whole input
    embedding table, which a step does not read); otherwise the fractions the record holds."""
    sz, bw = m.get("llama3_1_8b_sizing") or {}, m.get("d2d_copy_bandwidth_bytes_per_s")
    w, bpt = sz.get("step_weight_bytes"), sz.get("kv_bytes_per_token")
    if not all(isinstance(v, (int, float)) for v in (w, bpt, bw, d.get("batch"), d.get("context"))):
        return d.get("frac_of_roofline"), d.get("gpu_frac_of_roofline")
    roof_ms = (w + d["batch"] * (d["context"] + 1) * bpt) / bw * 1e3
    return tuple(roof_ms / d[k] if isinstance(d.get(k), (int, float)) else None for k in ("step_ms", "gpu_ms"))


def model_rows(record: dict) -> dict[str, str]:
    m, rows = record.get("model") or {}, {}
    sizing = m.get("llama3_1_8b_sizing") or {}
    if "kv_capacity_tokens" in sizing:
        rows["8B: KV capacity (tokens) at gpu_memory_utilization"] = f"{sizing['kv_capacity_tokens']:,}"
    pre = m.get("llama3_1_8b_prefill_2048") or {}
    if pre:
        rows["8B: prefill of 2048 tokens"] = _join(_f(pre.get("step_ms"), ".1f") and f"{pre['step_ms']:.1f} ms",
                                                   _f(pre.get("tflops"), ".0f") and f"{pre['tflops']:.0f} TFLOP/s")
    for d in m.get("llama3_1_8b_decode") or []:
        frac, gfrac = roofline_fractions(m, d)
        label = (f"8B: decode step, batch {d.get('batch')}, context {d.get('context')}, "
                 f"{d.get('layout', 'paged')}, {'CUDA graphs' if d.get('cuda_graphs') else 'eager'}"
                 + (", projections on cuBLAS" if "cublas" in (d.get("linear"), d.get("variant")) else "")
                 + (f", {d['variant']}" if d.get("variant") not in (None, "cublas") else ""))
        rows[label] = _join(_f(d.get("step_ms"), ".2f") and f"{d['step_ms']:.2f} ms",
                            _f(frac * 100 if isinstance(frac, (int, float)) else None, ".0f")
                            and f"{frac * 100:.0f} % of roofline",
                            _f(d.get("tokens_per_s"), ".0f") and f"{d['tokens_per_s']:.0f} tok/s",
                            _f(d.get("gpu_ms"), ".2f") and isinstance(gfrac, (int, float))
                            and f"graph replay alone {d['gpu_ms']:.2f} ms = {gfrac * 100:.0f} %")
    for key in sorted(k for k in m if k.startswith("correctness_")):
        for impl in ("triton", "reference"):
            c = (m[key] or {}).get(impl) or {}
            if c:
                rows[f"{key.removeprefix('correctness_')}: {impl} vs transformers (rel. err · top-1 agree)"] = _join(
                    _f(c.get("rel_err_vs_hf"), ".2e"), _f(c.get("top1_agree_vs_hf"), ".3f"))
    peak = (m.get("engine_summary_8b") or {}).get("peak_gpu_mem_bytes")
    if isinstance(peak, (int, float)):
        rows["8B engine: peak GPU memory"] = f"{peak / 2**30:.1f} GiB"
    if m.get("errors"):
        rows["model check errors"] = ", ".join(sorted(map(str, m["errors"])))
    return rows


def header_rows(record: dict) -> dict[str, str]:
    sw = record.get("software") or {}
    copy = next((r for r in record.get("kernels") or [] if r.get("kernel") == "copy"), None)
    gbps = copy.get("gbps") if copy else None
    if not isinstance(gbps, (int, float)):
        bw = (record.get("model") or {}).get("d2d_copy_bandwidth_bytes_per_s")
        gbps = bw / 1e9 if isinstance(bw, (int, float)) else None
    failed = [r["script"] for r in record.get("runs") or [] if r.get("returncode")]
    return {
        "measured": _join(record.get("measured") or record.get("recorded"),
                          record.get("commit") and f"commit {record['commit']}"),
        "software": _join(*(f"{k} {v}" for k, v in sorted(sw.items()) if v)),
        "device-to-device copy (GB/s, read + written)": _f(gbps, ".0f") or MISSING,
        **({"runs that failed": ", ".join(failed)} if failed else {}),
    }


def render_table(records: list[dict], source: str) -> str:
    if not records:
        return f"_No GPU records yet: run `python experiments/gpu_record.py run` on a GPU ({source}/)._"
    per_device: list[dict[str, str]] = [{} for _ in records]
    labels: list[str] = []
    for section in (header_rows, kernel_rows, model_rows):  # rows of all devices, section by section
        for rows, record in zip(per_device, records):
            part = section(record)
            rows.update(part)
            labels += [k for k in part if k not in labels]
    lines = [f"| | {' | '.join(r['device'] for r in records)} |",
             f"| --- |{' --- |' * len(records)}"]
    for label in labels:
        cells = [rows.get(label, MISSING).replace("|", "\\|") for rows in per_device]
        lines.append(f"| {label.replace('|', chr(92) + '|')} | {' | '.join(cells)} |")
    files = ", ".join(f"`{source}/{r['slug']}.json`" for r in records)
    note = f"<!-- generated by `python experiments/gpu_record.py table` from {files}; edit those, not this -->"
    return "\n".join([note, *lines])


def replace_between_markers(text: str, table: str, where: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise RecordError(f"{where}: needs exactly one '{BEGIN}' followed by one '{END}' line; add them "
                          f"where the GPU table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def cmd_table(args) -> int:
    readme, folder = Path(args.readme), Path(args.records)
    try:
        shown = folder.resolve().relative_to(REPO)
    except ValueError:
        shown = folder
    table = render_table(load_records(folder), str(shown))
    old = readme.read_text()
    new = replace_between_markers(old, table, str(readme))
    if args.check:
        if new != old:
            print(f"{readme}: the GPU table is stale; run: python experiments/gpu_record.py table", file=sys.stderr)
            return 1
        print(f"{readme}: the GPU table matches {shown}/")
        return 0
    if new != old:
        readme.write_text(new)
    print(f"{readme}: GPU table {'updated' if new != old else 'unchanged'} ({len(load_records(folder))} device(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run", help="run both GPU benchmarks and write results/gpu/<device>.json")
    run.add_argument("--out", default=str(REPO / "results" / "gpu"))
    run.add_argument("--skip-kernels", action="store_true")
    run.add_argument("--skip-model", action="store_true")
    run.add_argument("--kernels-args", type=shlex.split, default=[],
                     help='extra arguments of bench_kernels.py, one string: --kernels-args="--sweep"')
    run.add_argument("--model-args", type=shlex.split, default=[],
                     help='extra arguments of check_model_gpu.py, one string: --model-args="--skip-correctness"')
    col = sub.add_parser("collect", help="make a record from outputs the two scripts wrote elsewhere")
    col.add_argument("--kernels-csv")
    col.add_argument("--model-json")
    col.add_argument("--out", default=str(REPO / "results" / "gpu"))
    col.add_argument("--commit", help="the commit the outputs were measured at, if known")
    tab = sub.add_parser("table", help="regenerate the README table from the records")
    tab.add_argument("--readme", default=str(REPO / "README.md"))
    tab.add_argument("--records", default=str(REPO / "results" / "gpu"))
    tab.add_argument("--check", action="store_true", help="exit 1 if the README table is stale; write nothing")
    args = ap.parse_args(argv)
    try:
        return {"run": cmd_run, "collect": cmd_collect, "table": cmd_table}[args.mode](args)
    except RecordError as e:
        print(f"gpu_record: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
