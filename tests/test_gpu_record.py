"""experiments/gpu_record.py: records merge the two GPU scripts' outputs; the README table is
generated from the records between its markers, and a stale table is detected."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_record", REPO / "experiments" / "gpu_record.py")
gpu_record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_record)

KERNELS_CSV = """\
device,date,kernel,impl,shape,dtype,page_size,config,median_ms,gbps,tflops,ratio_to_copy,vs_sdpa,correct,note
NVIDIA H100 80GB HBM3,2026-11-26,copy,torch-copy_,2.00 GiB buffer,bf16,,,1.5000,2863.0,,1.000,,,
NVIDIA H100 80GB HBM3,2026-11-26,decode,triton,B=64 ctx=4096 Hq=32 Hkv=8 D=128,bf16,16,default,0.3100,2771.2,,0.968,1.250,ok,
NVIDIA H100 80GB HBM3,2026-11-26,extend,triton,4096 new after 4096,bf16,16,default,2.5000,,310.5,,,FAIL,
"""
MODEL = {
    "date": "2026-11-26 07:00 UTC", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
    "d2d_copy_bandwidth_bytes_per_s": 2.9e12,
    "llama3_1_8b_prefill_2048": {"step_ms": 80.0, "tflops": 410.0},
    "llama3_1_8b_decode": [{"batch": 64, "context": 2048, "layout": "paged", "cuda_graphs": True,
                            "step_ms": 14.5, "frac_of_roofline": 0.7, "tokens_per_s": 4413.0}],
    "correctness_llama3_2_1b_bfloat16": {"triton": {"rel_err_vs_hf": 0.028, "top1_agree_vs_hf": 0.889}},
    "errors": {},
}
H200_RECORD = {  # a record as the tool writes it, reduced to a few fields
    "schema": gpu_record.SCHEMA, "device": "NVIDIA H200", "slug": "nvidia-h200", "recorded": "2026-11-26 06:20 UTC",
    "measured": "2026-11-26 06:14 UTC", "software": {"torch": "2.11.0"}, "commit": "abc1234", "runs": [],
    "kernels": [], "model": {"device": "NVIDIA H200", "d2d_copy_bandwidth_bytes_per_s": 4.19e12,
                             "llama3_1_8b_prefill_2048": {"step_ms": 60.6, "tflops": 543.2}},
}
README = "# kvbench\n\nintro\n\n<!-- gpu-table:begin -->\nold table\n<!-- gpu-table:end -->\n\nafter\n"


@pytest.fixture
def records(tmp_path):
    folder = tmp_path / "gpu"
    folder.mkdir()
    (tmp_path / "k.csv").write_text(KERNELS_CSV)
    (tmp_path / "m.json").write_text(json.dumps(MODEL))
    assert gpu_record.main(["collect", "--kernels-csv", str(tmp_path / "k.csv"), "--model-json",
                            str(tmp_path / "m.json"), "--out", str(folder)]) == 0
    (folder / "nvidia-h200.json").write_text(json.dumps(H200_RECORD))
    (folder / "check_model_gpu.json").write_text(json.dumps(MODEL))  # a raw output: not a record
    return folder


def test_collect_merges_kernel_rows_and_model_results_into_one_record_per_device(records):
    rec = json.loads((records / "nvidia-h100-80gb-hbm3.json").read_text())
    assert rec["schema"] == gpu_record.SCHEMA and rec["device"] == "NVIDIA H100 80GB HBM3"
    assert rec["measured"] == "2026-11-26 07:00 UTC"
    assert [r["kernel"] for r in rec["kernels"]] == ["copy", "decode", "extend"]
    assert rec["kernels"][1]["median_ms"] == 0.31 and rec["kernels"][1]["page_size"] == 16
    assert rec["kernels"][0]["page_size"] is None  # empty cells are missing values
    assert rec["model"]["llama3_1_8b_prefill_2048"]["tflops"] == 410.0
    assert [r["device"] for r in gpu_record.load_records(records)] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]


def test_table_is_generated_between_the_markers_and_is_idempotent(records, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["table", "--readme", str(readme), "--records", str(records)]
    assert gpu_record.main([*args, "--check"]) == 1  # "old table" is stale
    assert gpu_record.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# kvbench\n\nintro\n\n<!-- gpu-table:begin -->\n") and text.endswith(
        "\n<!-- gpu-table:end -->\n\nafter\n")
    assert "old table" not in text
    lines = text.split(gpu_record.BEGIN)[1].split(gpu_record.END)[0].strip().splitlines()
    assert lines[1] == "| | NVIDIA H100 80GB HBM3 | NVIDIA H200 |"
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines[3:]}
    assert rows["device-to-device copy (GB/s, read + written)"].endswith("| 2863 | 4190 |")
    decode = rows["kernel: decode · triton · p=16 · B=64 ctx=4096 Hq=32 Hkv=8 D=128"]
    assert decode.endswith("| 0.31 ms · 97 % of copy · 1.25× SDPA speed | – |")
    assert "310 TFLOP/s · FAILED CHECK" in rows["kernel: extend · triton · p=16 · 4096 new after 4096"]
    assert rows["8B: prefill of 2048 tokens"].endswith("| 80.0 ms · 410 TFLOP/s | 60.6 ms · 543 TFLOP/s |")
    assert "14.50 ms · 70 % of roofline · 4413 tok/s | – |" in rows[
        "8B: decode step, batch 64, context 2048, paged, CUDA graphs"]
    assert "2.80e-02 · 0.889" in rows["llama3_2_1b_bfloat16: triton vs transformers (rel. err · top-1 agree)"]
    assert gpu_record.main([*args, "--check"]) == 0
    assert gpu_record.main(args) == 0 and readme.read_text() == text  # unchanged on a second run


def test_missing_markers_and_mixed_devices_are_errors(records, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert gpu_record.main(["table", "--readme", str(readme), "--records", str(records)]) == 2
    assert "gpu-table:begin" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({**MODEL, "device": "NVIDIA H200"}))
    assert gpu_record.main(["collect", "--kernels-csv", str(tmp_path / "k.csv"), "--model-json",
                            str(tmp_path / "other.json"), "--out", str(tmp_path / "x")]) == 2
    assert "different devices" in capsys.readouterr().err


def test_empty_record_folder_gives_a_placeholder(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert gpu_record.main(["table", "--readme", str(readme), "--records", str(tmp_path)]) == 0
    assert "No GPU records yet" in readme.read_text()


def test_roofline_fraction_is_recomputed_from_the_bytes_a_step_reads():
    row = {"batch": 2, "context": 999, "step_ms": 5.0, "gpu_ms": 4.0, "frac_of_roofline": 0.9}
    model = {"d2d_copy_bandwidth_bytes_per_s": 1e12, "llama3_1_8b_sizing": {"weight_bytes": 4.5e9}}
    assert gpu_record.roofline_fractions(model, row) == (0.9, None)  # old record: its own fractions
    model["llama3_1_8b_sizing"].update(step_weight_bytes=3.5e9, kv_bytes_per_token=125_000)
    # (3.5e9 weights + 2 * 1000 tokens * 125 kB) / 1 TB/s = 3.75 ms
    assert gpu_record.roofline_fractions(model, row) == pytest.approx((0.75, 0.9375))
