#!/usr/bin/env bash
# The GPU runs behind the H200 cost models (results/gpu_strategies/README.md, 5444c26 section), in
# one call of a lent GPU machine: gpu_strategies' six Azure configs (GS=1; run it twice into the
# same OUT, the second with REPEAT=1, for the GPU's own run-to-run spread) and the prefix-saving
# sweeps (PS="sp mt mc": shared prefix, multi-turn, Mooncake), 1B shape, graphs of steps with
# prefill captured on first use (engine.graph_warmup=decode: ~8 s of start-up a run, not 90-200).
# Each stage ends before BUDGET seconds (default 570) and is tarred into OUT (run folders nest too
# deep for a device's copy-back). Then, on any machine, with the tars unpacked into DIR, gs_gpu
# renamed DIR/gs and each DIR/gs_gpu_repeat/runs/<case>/gpu moved to DIR/gs/runs/<case>/gpu_repeat:
#   python experiments/gpu_strategies.py --out DIR/gs --limit 300 --set engine.graph_warmup=decode \
#       --prefix-runs DIR/ps_sp DIR/ps_mt DIR/ps_mc
#   python experiments/refit_with_pairs.py DIR --out DIR/one --sweep ps_sp=DIR/ps_sp
#   python experiments/prefix_saving.py DIR/ps_sp DIR/ps_mt DIR/ps_mc --out results/gpu_prefix_saving/h200_<commit>
#
#   GS=1 PS="sp mt mc" bash experiments/gpu_refit_runs.sh OUT    (PYTHONPATH: the checkout, hydra's wheels;
#   KVBENCH_COMMIT=<commit> on a device's copy of the tree: each run's summary.json names it)
#   MODEL=llama3_1_8b MC_LIMIT=40 PS="sp mt" bash experiments/gpu_refit_runs.sh OUT   (the 8B shape; gs: --model)
#
# Timings on an H200 (c438584, 2026-12-02): GS=1 130 s, PS=sp 130 s (its three runs), PS=mt 90 s,
# PS=mc 110-210 s (on a fresh machine the kernels compile first); GS=1 on a fresh machine over 170 s (47e4085);
# the 8B (MODEL=llama3_1_8b): PS=sp 235 s, PS=mt 125 s (47e4085). So the whole set needs two calls, e.g. GS=1
# PS="sp mt", then GS=1 REPEAT=1 PS=mc. PS="mt mt64 mt256": 237 + 142 + 64 s on a fresh machine (115bde3);
# WARMUP="engine.graph_warmup=all engine.max_num_seqs=16" STRATEGIES=paged PS=mt: about 80 s (155dbe6, 54 s warm-up);
# the same with all four strategies 406 s on a fresh machine, STRATEGIES=radix,radix_nocache,paged 358 s (95fa220).
# The 8B with that warm-up: STRATEGIES=paged,radix PS=mt 536 s on a fresh machine (aa7b354; a run 246-277 s, 159-176 s
# of it capturing 1,659-1,679 graphs), so the 8B's four multi-turn runs need two calls.
set -u
out=${1:?usage: GS=1 PS="sp mt mc" bash experiments/gpu_refit_runs.sh OUT}
mkdir -p "$out"
end=$(( $(date +%s) + ${BUDGET:-570} ))
left() { echo $(( end - $(date +%s) )); }
W=${WARMUP:-engine.graph_warmup=decode}  # (WARMUP="engine.graph_warmup=all engine.max_num_seqs=16":
#   no capture in a 1B replay; the 8B runs, up to 34 running, captured 39-84 graphs of > 16 requests in theirs)
M=${MODEL:-llama3_2_1b}
if [ -n "${GS:-}" ]; then
  sub=gpu; [ -n "${REPEAT:-}" ] && sub=gpu_repeat
  timeout $(( $(left) - 20 )) python experiments/gpu_strategies.py --out "$out/gs_$sub" --limit 300 --no-repeat \
      --model "$M" --set $W > "$out/gs_$sub.log" 2>&1
  echo "gs ($sub) rc=$? left $(left) s"
  tar czf "$out/gs_$sub.tgz" -C "$out" "gs_$sub" && rm -rf "${out:?}/gs_$sub"
fi
for spec in ${PS:-}; do
  # spNN / mtNN / mcNN: the runs without caching only, in prefill chunks of NN tokens a step
  # (scheduler.max_num_batched_tokens=NN): their chunks attend over long prefixes of their own, so
  # the fit of what the runs with caching are judged against measures the query-key pair term
  # (prefix_saving.py --chunked) instead of extrapolating it
  chunk=${spec:2}; s=${STRATEGIES:+strategy=$STRATEGIES}  # (STRATEGIES=paged,radix: a subset of the sweep's; not for spNN)
  [ -n "$chunk" ] && s="strategy=paged_nocache,radix_nocache scheduler.max_num_batched_tokens=$chunk"
  case ${spec:0:2} in
    sp) a="trace=shared_prefix";;
    mt) a="trace=multi_turn trace.num_chats=48 trace.think_time_s=1.0 trace.rate=4";;
    mc) a="trace=mooncake trace.limit=${MC_LIMIT:-120} trace.rate=inf max_model_len=65536";;
    *) echo "unknown sweep $spec (sp, mt, mc, each optionally with a chunk size: mt64)"; continue;;
  esac
  [ "$(left)" -lt 40 ] && { echo "no time left for $spec"; continue; }
  timeout $(( $(left) - 15 )) python -m kvbench.cli -m experiment=gpu_prefix_saving model="$M" $a $s $W \
      hydra.sweep.dir="$out/ps_$spec" > "$out/ps_$spec.log" 2>&1
  echo "ps_$spec rc=$? left $(left) s"
  tar czf "$out/ps_$spec.tgz" -C "$out" "ps_$spec" && rm -rf "${out:?}/ps_$spec"
done
