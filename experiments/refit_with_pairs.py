"""One cost model, with the prefill query-key pair term, for every GPU run of a session: replay
each on its own clock (engine=recorded: the timeline then records prefill_pairs), fit once on all
steps, replay the sim with that model, and compare throughput, mean TTFT and mean TPOT with the GPU.

    python experiments/refit_with_pairs.py GPU_DIR --out DIR

GPU_DIR holds `gs/runs/<case>/gpu` (experiments/gpu_strategies.py) and the prefix-saving sweeps
`ps_mt/<run>`, `ps_mc/<run>` (`kvbench -m experiment=gpu_prefix_saving ...`). Writes
DIR/coef.json and DIR/fidelity.csv (the recorded and sim run dirs under DIR/runs)."""
import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_strategies import STALL, register, rel_err, same, with_engine  # noqa: E402

from kvbench.calibrate import fit, graph_prefill_tokens  # noqa: E402
from kvbench.run import run  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("gpu_dir", type=Path)
ap.add_argument("--out", type=Path, required=True)
args = ap.parse_args()
if not (args.gpu_dir / "gs" / "runs").is_dir():
    print(f"refit_with_pairs: error: {args.gpu_dir} has no gs/runs (a gpu_strategies --out folder)", file=sys.stderr)
    sys.exit(2)
register()
R = args.gpu_dir
dirs = {f"gs/{c}": R / "gs" / "runs" / c / "gpu" for c in sorted(p.name for p in (R / "gs" / "runs").iterdir())}
for sweep in ("ps_mt", "ps_mc"):  # run dirs that finished (a summary.json)
    dirs |= {f"{sweep}/{d.name}": d for d in sorted((R / sweep).glob("*/summary.json")) for d in [d.parent]}
out = args.out / "runs"
tls, base, gpu, rep = {}, {}, {}, {}
for k, d in dirs.items():
    base[k] = OmegaConf.load(d / "config.yaml")
    gpu[k] = json.loads((d / "summary.json").read_text())
    r = d.parent / "gpu_repeat" / "summary.json"
    rep[k] = json.loads(r.read_text()) if d.name == "gpu" and r.exists() else None
    o = out / k.replace("/", "_") / "recorded"
    if not (o / "timeline.parquet").exists():
        run(with_engine(base[k], ["engine=recorded", f"engine.timeline={(d / 'timeline.parquet').resolve()}"]), o)
    t = pd.read_parquet(o / "timeline.parquet")
    tls[k] = t
    print(k, len(t), int(t.prefill_pairs.max()), flush=True)
gm = {graph_prefill_tokens(d) for d in dirs.values()}.pop()
coef = fit(pd.concat(tls.values(), ignore_index=True), stall=STALL, graph_prefill_tokens=gm)
print("coef", json.dumps(coef), flush=True)
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "coef.json").write_text(json.dumps(coef, indent=1))
rows = []
for k in dirs:
    s = run(with_engine(base[k], ["engine=sim"], coef), out / k.replace("/", "_") / "sim")
    ts = pd.read_parquet(out / k.replace("/", "_") / "sim" / "timeline.parquet")
    g = gpu[k]
    row = dict(case=k, same_decisions=same(tls[k], ts),
               throughput_err=rel_err(s["request_throughput"], g["request_throughput"]),
               ttft_mean_err=rel_err(s["ttft_mean_s"], g["ttft_mean_s"]),
               tpot_mean_err=rel_err(s["tpot_mean_s"], g["tpot_mean_s"]))
    if rep[k]:
        row["gpu_repeat_ttft_mean_diff"] = rel_err(rep[k]["ttft_mean_s"], g["ttft_mean_s"])
    rows.append(row)
    print(json.dumps(row), flush=True)
df = pd.DataFrame(rows)
df.to_csv(args.out / "fidelity.csv", index=False)
print(df.to_string(index=False))
