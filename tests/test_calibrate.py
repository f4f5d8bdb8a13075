"""The cost-model fit recovers the coefficients that produced a timeline."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from kvbench.calibrate import fit
from test_end_to_end import CONFIGS, run_with


def test_fit_recovers_known_coefficients_and_keeps_them_non_negative():
    rng = np.random.default_rng(0)
    n = 400
    tl = pd.DataFrame({"prefill_tokens": rng.integers(0, 4000, n), "decode_tokens": rng.integers(0, 64, n),
                       "kv_read_tokens": rng.integers(0, 200000, n)})
    tl["dt_s"] = 0.004 + 2e-5 * tl.prefill_tokens + 0.0 * tl.decode_tokens + 5e-8 * tl.kv_read_tokens
    coef = fit(tl)
    assert coef["overhead_s"] == pytest.approx(0.004, rel=1e-9)
    assert coef["prefill_token_s"] == pytest.approx(2e-5, rel=1e-9)
    assert coef["kv_read_token_s"] == pytest.approx(5e-8, rel=1e-9)
    assert coef["decode_token_s"] == pytest.approx(0.0, abs=1e-12)


def test_calibrating_on_a_sim_run_gives_back_the_sim_config(tmp_path):
    run_with(tmp_path / "run", "trace.num_requests=80")
    out = tmp_path / "sim_fitted.yaml"
    subprocess.run([sys.executable, "-m", "kvbench.calibrate", str(tmp_path / "run"), "--out", str(out)],
                   check=True, capture_output=True)
    fitted, sim = OmegaConf.load(out), OmegaConf.load(CONFIGS / "engine" / "sim.yaml")
    assert list(fitted.defaults) == ["sim", "_self_"]
    for key in ("overhead_s", "prefill_token_s", "decode_token_s", "kv_read_token_s"):
        assert fitted[key] == pytest.approx(sim[key], rel=1e-5)
