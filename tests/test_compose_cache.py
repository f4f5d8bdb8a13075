"""A sweep job's config through the per-process compose memo (kvbench.compose_cache) is the config
a fresh Hydra compose makes: same keys, values, flags and errors; a job never sees another's edits."""
from __future__ import annotations

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

from kvbench import compose_cache
from kvbench.cli import CONFIG_DIR
from kvbench.schema import register

SWEEP = ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=/tmp/kvbench-test-sweep"]


def _loader_and_master():
    register()
    compose_cache.install()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONFIG_DIR))
    master = loader.load_configuration("config", SWEEP + ["experiment=throughput_vs_rate"], RunMode.MULTIRUN)
    return loader, master


def _fresh(loader, master, job):
    """What Hydra's load_sweep_config composes, outside the memo (it is active only inside it)."""
    cfg = loader.load_configuration("config", list(master.hydra.overrides.hydra) + job, RunMode.RUN)
    OmegaConf.copy_cache(from_config=master, to_config=cfg)
    return cfg


def _view(cfg) -> tuple:
    flags = [(OmegaConf.is_struct(n), OmegaConf.is_readonly(n)) for n in (cfg, cfg.hydra, cfg.trace, cfg.strategy)]
    return OmegaConf.to_yaml(cfg), OmegaConf.to_yaml(cfg, resolve=False).count("\n"), flags, OmegaConf.get_type(cfg)


def test_memo_jobs_equal_fresh_composes_and_are_reused(monkeypatch):
    loader, master = _loader_and_master()
    made = []

    class Counted(dict):
        def __setitem__(self, key, value):
            made.append(key)
            super().__setitem__(key, value)

    monkeypatch.setattr(compose_cache, "_DEFAULTS", Counted())
    grid = [[f"strategy={s}", "trace=azure_conv", f"trace.rate={r}", "max_model_len=8192", "trace.limit=50"]
            for s in ("slab", "paged", "radix") for r in (1, 2.5, 16)]
    grid += [["strategy=paged", "trace=shared_prefix", "model=tiny", "kv_capacity_tokens=4096", "strategy.page_size=8"],
             ["strategy=radix", "scheduler.policy=lpm"],
             ["strategy=slab", "trace=azure_conv", "hydra.job.chdir=true", "trace.rate=2"]]  # (hydra.job set: Hydra's own order)
    for job in grid:
        memo = loader.load_sweep_config(master, job)
        assert _view(memo) == _view(_fresh(loader, master, job)), job
        assert list(memo.hydra.overrides.task) == [o for o in job if not o.startswith("hydra.")] and memo.hydra.runtime.choices.strategy == job[0].split("=")[1]
    assert len(made) == 5  # one defaults list per group choice (slab, paged, radix; paged+shared_prefix+tiny; radix)


def test_a_job_never_sees_another_jobs_edits():
    loader, master = _loader_and_master()
    first = loader.load_sweep_config(master, ["strategy=paged", "trace.rate=3"])
    first.trace.rate = 999.0
    first.strategy.page_size = 7
    second = loader.load_sweep_config(master, ["strategy=paged", "trace.rate=4"])
    assert second.trace.rate == 4 and second.strategy.page_size == _fresh(loader, master, ["strategy=paged"]).strategy.page_size


@pytest.mark.parametrize("job", [["strategy=no_such_strategy"], ["max_model_len=not_a_number"],
                                 ["strategy=paged", "no_such_key=1"]])
def test_a_bad_job_fails_as_a_fresh_compose_does_every_time(job):
    loader, master = _loader_and_master()
    errors = []
    for compose in (lambda: _fresh(loader, master, job), lambda: loader.load_sweep_config(master, job),
                    lambda: loader.load_sweep_config(master, job)):
        with pytest.raises(ConfigCompositionException) as err:
            compose()
        errors.append((type(err.value), str(err.value)))
    assert errors[0] == errors[1] == errors[2]


def test_a_job_that_adds_a_search_path_changes_no_other_job(tmp_path):
    loader, master = _loader_and_master()
    (tmp_path / "strategy").mkdir()
    (tmp_path / "strategy" / "paged_extra.yaml").write_text("defaults:\n  - paged\n  - _self_\npage_size: 32\n")
    extra = [f"hydra.searchpath=[file://{tmp_path}]", "strategy=paged_extra"]
    for job in (extra, ["strategy=paged"], extra):
        assert _view(loader.load_sweep_config(master, job)) == _view(_fresh(loader, master, job)), job
    assert loader.load_sweep_config(master, extra).strategy.page_size == 32
    with pytest.raises(ConfigCompositionException):  # the search path stayed with the job that set it
        loader.load_sweep_config(master, ["strategy=paged_extra"])


@pytest.mark.parametrize("overrides", [SWEEP + ["experiment=throughput_vs_rate"], SWEEP + ["strategy=paged,radix", "hydra.mode=MULTIRUN"]])
def test_the_sweep_compose_after_get_mode_equals_a_fresh_one(overrides):
    """Hydra.get_mode's compose serves the multirun compose right after it (one override more:
    the hydra.mode line _run_app appends when the config sets no mode); the config is a fresh one's."""
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra

    register()
    compose_cache.install()
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(task_name="kvbench", config_search_path=create_config_search_path(CONFIG_DIR))
    fresh = hydra.config_loader.load_configuration("config", overrides + ["hydra.mode=MULTIRUN"], RunMode.MULTIRUN)
    hydra.get_mode("config", list(overrides))
    assert "last" in compose_cache._MODE_COMPOSE
    reused = hydra.config_loader.load_configuration("config", overrides + ["hydra.mode=MULTIRUN"], RunMode.MULTIRUN)
    assert _view(reused) == _view(fresh)
    assert OmegaConf.to_yaml(reused.hydra, resolve=False) == OmegaConf.to_yaml(fresh.hydra, resolve=False)
    assert compose_cache._MODE_COMPOSE == {}
    hydra.get_mode("config", ["hydra.job.chdir=true,false"])  # a sweep over Hydra's config: still refused
    with pytest.raises(ConfigCompositionException, match="Sweeping over Hydra's configuration"):
        hydra.config_loader.load_configuration("config", ["hydra.job.chdir=true,false", "hydra.mode=MULTIRUN"],
                                               RunMode.MULTIRUN)
    GlobalHydra.instance().clear()
