"""A sweep's jobs composed from one memo per process (issue 13 §5: a 100-run sweep's start-up).

Hydra composes every job of a sweep from scratch (`ConfigLoaderImpl.load_sweep_config`: parse the
overrides, build the defaults list, load and merge every yaml of it, then apply the job's
`key=value` overrides), in the parent (to check the grid) and again in the worker that runs it:
~0.1 s of CPU a job, more than a 100-request run's replay (0.03 s). Jobs of one grid differ
mostly in values (`trace.rate=4`), not in the config groups they pick (`strategy=paged`), and the
defaults list and the merged yaml depend on the group choices only. So, inside
`load_sweep_config` only, this keeps per process:
- the defaults list, keyed by the config name, the search path and the overrides that pick or
  add config groups (Hydra's own rule: `repo.group_exists(key)` and a value that is not a dict);
  the job's value overrides are handed on as its `config_overrides`, in its order;
- the config merged from that defaults list, pickled (a copy, unpickled, is handed out each time:
  Hydra then sets its flags and applies the value overrides to the copy, as it does to a fresh
  compose; unpickling is ~6x faster than the deep copy it replaces);
- the parsed form of each override string (Hydra's parser makes immutable Override records),
  one override parser, and whether a name is a config group (per search path);
- one copy of the config repository's sources per search path (Hydra deep-copies them, with the
  ConfigStore, for every compose; a compose that changes the search path gets its own copy).
The yaml files are thus read once per process for a sweep's jobs (as the ConfigStore already was).
Everything else (value overrides, `hydra.overrides`, `hydra.runtime`, the job's dirs) is done by
Hydra as before, so a job's config is the one a fresh compose makes (tests/test_compose_cache.py
compares them; 0.10 -> 0.04 s a job). A compose that fails is not kept: the next job fails the
same way. Other callers of Hydra's loader (`compose()`, a single run) are untouched.

Also, for every caller: OmegaConf's parse of an interpolation string (`${oc.select:model.vocab_size,
32000}`, the sweep's subdir) is kept per string. OmegaConf parses the string again with its ANTLR
grammar (~0.3 ms) every time the value is read, resolved, copied or dumped, ~12 times a job; the
tree is only read by its visitor afterwards, so one tree serves every read (a string that does not
parse raises as before and is not kept).

Also, in a sweep's process: Hydra composes the whole config twice before the sweep starts, once
to read `hydra.mode` (`Hydra.get_mode`, which drops the config) and once more for the sweep with
the same overrides (`Hydra.multirun`); the second takes the first's config (its sweep overrides
checked then, as Hydra's own compose checks them): ~0.1 s of the sweep's serial start.

`install()` mutates ConfigLoaderImpl, Hydra.get_mode, OverridesParser.parse_overrides,
config_loader_impl.create_defaults_list and the `parse` that omegaconf.base and omegaconf._utils
call, once per process.
"""
from __future__ import annotations

import contextvars
import copy
import pickle
import weakref
from typing import Any

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("kvbench_sweep_compose", default=False)
_DEFAULTS: dict[tuple, Any] = {}  # key -> DefaultsList of the group choices
_MERGED: dict[int, tuple[Any, Any]] = {}  # id(defaults) -> (defaults, merged config pickled: never handed out itself)
_PARSED: dict[str, Any] = {}  # override string -> Override
_SOURCES: dict[tuple, Any] = {}  # search path -> the repository (sources) a job's caching repository reads
_TEMPLATES: dict[tuple, tuple[Any, bytes | None]] = {}  # (id(defaults), name, cwd, sources) -> (defaults, the job-independent compose pickled)
_LOADED: "weakref.WeakKeyDictionary[Any, dict[str, bytes]]" = weakref.WeakKeyDictionary()  # repository -> file -> ConfigResult pickled
_PLAIN: set[tuple] = set()  # (search path, config name) whose primary config sets no hydra.searchpath
_IN_GET_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar("kvbench_get_mode", default=False)
_MODE_COMPOSE: dict[str, tuple[tuple, Any]] = {}  # "last" -> (the load's key, the config get_mode composed and dropped)
_GROUPS: dict[tuple, bool] = {}  # (search path, name) -> whether a config group of that name exists
_PARSER: dict[str, Any] = {}  # "parser" -> one OverridesParser (no config loader) for the process
_MAX = 256  # memo entries of each kind (a sweep picks few group combinations)
_TREES: dict[tuple[str, str, str], Any] = {}  # (interpolation string, rule, lexer mode) -> its parse tree
_MAX_TREES = 4096


def _memo_grammar_parse() -> None:
    """OmegaConf's grammar_parser.parse kept per (string, rule, mode) wherever OmegaConf calls it."""
    import omegaconf._utils
    import omegaconf.base
    from omegaconf import grammar_parser

    whole = grammar_parser.parse
    if getattr(omegaconf.base.parse, "_kvbench", False):
        return

    def parse(value: str, parser_rule: str = "configValue", lexer_mode: str = "DEFAULT_MODE"):
        key = (value, parser_rule, lexer_mode)
        tree = _TREES.get(key)
        if tree is None:
            tree = whole(value, parser_rule, lexer_mode)  # (an error is raised, not kept)
            if len(_TREES) >= _MAX_TREES:
                _TREES.clear()
            _TREES[key] = tree
        return tree

    parse._kvbench = True
    omegaconf.base.parse = parse
    omegaconf._utils.parse = parse


def _load_kept(repo: Any, config_path: str) -> Any:
    """repo.load_config(config_path=config_path), read and parsed once per repository and process
    (a sweep's first composes of each group choice read the same ~15 yaml files); a copy, unpickled,
    each time after the first. Errors are raised, not kept."""
    kept = _LOADED.setdefault(repo, {})
    blob = kept.get(config_path)
    if blob is None:
        loaded = repo.load_config(config_path=config_path)
        try:
            kept[config_path] = pickle.dumps(loaded, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # (not picklable: read every time)
            kept[config_path] = b""
        return loaded
    return pickle.loads(blob) if blob else repo.load_config(config_path=config_path)


def _job_state(key: str) -> bool:
    """Whether a value override sets what Hydra fills in after the overrides (hydra.runtime, hydra.job)."""
    return key in ("hydra", "hydra.job", "hydra.runtime") or key.startswith(("hydra.runtime.", "hydra.job."))


def _group_exists(repo: Any, sources: tuple, name: str) -> bool:
    """repo.group_exists(name), kept per search path and name for the process: each job asked it
    of every value override (`trace.rate` is no group), a walk of every config source's folders."""
    key = (sources, name)
    if key not in _GROUPS:
        if len(_GROUPS) >= 4 * _MAX:
            _GROUPS.clear()
        _GROUPS[key] = bool(repo.group_exists(name))
    return _GROUPS[key]


def _source_key(repo: Any) -> tuple:
    return tuple((s.provider, s.path) for s in repo.get_sources())


def install() -> None:
    """Route Hydra's per-job compose through the memos above (idempotent)."""
    import os

    from hydra import __version__ as hydra_version
    from hydra._internal import config_loader_impl as cli_mod
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.conf import ConfigSourceInfo
    from hydra.core.utils import JobRuntime
    from hydra.types import RunMode
    from omegaconf import open_dict
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_repository import CachingConfigRepository
    from hydra._internal.defaults_list import DefaultsList
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    _memo_grammar_parse()
    if getattr(ConfigLoaderImpl.load_sweep_config, "_kvbench", False):
        return
    whole_sweep_config = ConfigLoaderImpl.load_sweep_config
    whole_defaults = cli_mod.create_defaults_list
    whole_merge = ConfigLoaderImpl._compose_config_from_defaults_list
    whole_parse = OverridesParser.parse_overrides

    def load_sweep_config(self, master_config, sweep_overrides):
        token = _ACTIVE.set(True)
        try:
            return whole_sweep_config(self, master_config, sweep_overrides)
        finally:
            _ACTIVE.reset(token)

    def parse_overrides(self, overrides):
        if not _ACTIVE.get() or self.config_loader is not None:  # (a loader: glob() sweeps read it)
            return whole_parse(self, overrides)
        todo = [o for o in overrides if o not in _PARSED]
        if todo:
            if len(_PARSED) > 4 * _MAX:
                _PARSED.clear()
            _PARSED.update(zip(todo, whole_parse(self, todo)))  # one parse per string, errors as before
        return [_PARSED[o] for o in overrides]

    def create_defaults_list(repo, config_name, overrides_list, prepend_hydra, skip_missing):
        if not _ACTIVE.get():
            return whole_defaults(repo, config_name, overrides_list, prepend_hydra, skip_missing)
        values, groups = [], []
        sources = _source_key(repo)
        for o in overrides_list:  # Hydra's split (defaults_list.Overrides.__init__)
            if o.is_sweep_override():
                groups.append(o)
            elif isinstance(o.value(), dict) or not _group_exists(repo, sources, o.key_or_group):
                values.append(o)
            else:
                groups.append(o)
        key = (config_name, prepend_hydra, skip_missing, sources, tuple(o.input_line for o in groups))
        if key not in _DEFAULTS:
            if len(_DEFAULTS) >= _MAX:
                _DEFAULTS.clear()
            _DEFAULTS[key] = whole_defaults(repo, config_name, groups, prepend_hydra, skip_missing)
        kept = _DEFAULTS[key]
        return DefaultsList(defaults=kept.defaults, config_overrides=values, defaults_tree=kept.defaults_tree,
                            overrides=kept.overrides)

    def compose_config_from_defaults_list(self, defaults, repo):
        if not _ACTIVE.get():
            return whole_merge(self, defaults, repo)
        kept = _MERGED.get(id(defaults))
        if kept is None or kept[0] is not defaults:
            if len(_MERGED) >= _MAX:
                _MERGED.clear()
            merged = whole_merge(self, defaults, repo)
            try:  # a copy is unpickled from this (~1 ms; a deep copy of Hydra's config takes ~5-7)
                merged = pickle.dumps(merged, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # (a value pickle cannot take: deep copies then)
                pass
            kept = _MERGED[id(defaults)] = (defaults, merged)
        return pickle.loads(kept[1]) if isinstance(kept[1], bytes) else copy.deepcopy(kept[1])

    class SharedSourcesRepository(CachingConfigRepository):
        """Hydra's per-compose caching repository over a kept copy of the sources; the copy is
        made private before a search-path change would mutate it."""

        def __init__(self, shared) -> None:  # (not CachingConfigRepository's: no deep copy)
            self.delegate, self.cache = shared, {}

        def load_config(self, config_path):
            """CachingConfigRepository's, over a per-process memo of each file's ConfigResult
            (pickled: the compose pops and replaces parts of what it loads)."""
            cache_key = f"config_path={config_path}"
            if cache_key not in self.cache:
                self.cache[cache_key] = _load_kept(self.delegate, config_path)
            return self.cache[cache_key]

        def initialize_sources(self, config_search_path) -> None:
            self.delegate = copy.deepcopy(self.delegate)
            self.delegate.initialize_sources(config_search_path)

    whole_repo = ConfigLoaderImpl._parse_overrides_and_create_caching_repo

    def parse_overrides_and_create_caching_repo(self, config_name, overrides):
        if not _ACTIVE.get():
            return whole_repo(self, config_name, overrides)
        if "parser" not in _PARSER:  # (create() registers the grammar's functions by signature: ~1 ms)
            _PARSER["parser"] = OverridesParser.create()
        parsed = _PARSER["parser"].parse_overrides(overrides=overrides)
        key = _source_key(self.repository)
        if key not in _SOURCES:
            if len(_SOURCES) >= _MAX:
                _SOURCES.clear()
            _SOURCES[key] = copy.deepcopy(self.repository)
        repo = SharedSourcesRepository(_SOURCES[key])
        if any(o.get_key_element() == "hydra.searchpath" for o in parsed) or config_name is None:
            self._process_config_searchpath(config_name, parsed, repo)
        elif (key, config_name) not in _PLAIN:  # else Hydra would load the primary yaml only to find no search path
            self._process_config_searchpath(config_name, parsed, repo)
            loaded = repo.load_config(config_path=config_name)
            if loaded is not None and OmegaConf.select(loaded.config, "hydra.searchpath") is None:
                _PLAIN.add((key, config_name))
        return parsed, repo

    whole_impl = ConfigLoaderImpl._load_configuration_impl

    def load_configuration_impl(self, config_name, overrides, run_mode, from_shell=True,
                                validate_sweep_overrides=True):
        """Hydra 1.3's _load_configuration_impl step for step, with the steps that the job's value
        overrides do not change (flags, hydra.runtime.choices/version/cwd/config_sources,
        hydra.job.name/config_name: ~40 % of a kept compose) done once per group choice and
        kept in a pickled template; a value override of hydra.runtime or hydra.job, or
        hydra.job.env_copy set: Hydra's own order."""
        if not _ACTIVE.get() or not hydra_version.startswith("1.3."):
            return whole_impl(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
        self.ensure_main_config_source_available()
        parsed_overrides, caching_repo = self._parse_overrides_and_create_caching_repo(config_name, overrides)
        if validate_sweep_overrides:
            self.validate_sweep_overrides_legal(overrides=parsed_overrides, run_mode=run_mode, from_shell=from_shell)
        defaults_list = cli_mod.create_defaults_list(repo=caching_repo, config_name=config_name,
                                                     overrides_list=parsed_overrides, prepend_hydra=True,
                                                     skip_missing=run_mode == RunMode.MULTIRUN)
        config_overrides = defaults_list.config_overrides
        if any(_job_state(o.key_or_group) for o in config_overrides):
            return whole_impl(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
        key = (id(defaults_list.defaults), config_name, os.getcwd(), _source_key(caching_repo))
        kept = _TEMPLATES.get(key)
        if kept is None or kept[0] is not defaults_list.defaults:
            if len(_TEMPLATES) >= _MAX:
                _TEMPLATES.clear()
            kept = _TEMPLATES[key] = (defaults_list.defaults, _template(self, config_name, defaults_list, caching_repo))
        if kept[1] is None:
            return whole_impl(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
        cfg = pickle.loads(kept[1])
        ConfigLoaderImpl._apply_overrides_to_config(config_overrides, cfg)
        app_overrides = []
        for override in parsed_overrides:
            if override.is_hydra_override():
                cfg.hydra.overrides.hydra.append(override.input_line)
            else:
                cfg.hydra.overrides.task.append(override.input_line)
                app_overrides.append(override)
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app_overrides, kv_sep=cfg.hydra.job.config.override_dirname.kv_sep,
            item_sep=cfg.hydra.job.config.override_dirname.item_sep,
            exclude_keys=cfg.hydra.job.config.override_dirname.exclude_keys)
        return cfg

    def _template(self, config_name, defaults_list, caching_repo) -> bytes | None:
        """The job-independent part of a compose, pickled (None: env_copy set, or not picklable)."""
        from hydra import version

        cfg = self._compose_config_from_defaults_list(defaults=defaults_list.defaults, repo=caching_repo)
        OmegaConf.set_struct(cfg, True)
        OmegaConf.set_readonly(cfg.hydra, False)
        if len(cfg.hydra.job.env_copy):  # (os.environ read per job)
            return None
        with open_dict(cfg.hydra):
            cfg.hydra.runtime.choices.update(defaults_list.overrides.known_choices)
        cfg.hydra.runtime.version = hydra_version
        cfg.hydra.runtime.version_base = version.getbase()
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.config_sources = [ConfigSourceInfo(path=x.path, schema=x.scheme(), provider=x.provider)
                                            for x in caching_repo.get_sources()]
        if "name" not in cfg.hydra.job:
            cfg.hydra.job.name = JobRuntime().get("name")
        cfg.hydra.job.config_name = config_name
        try:
            return pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return None

    from hydra._internal.hydra import Hydra

    whole_get_mode, whole_load = Hydra.get_mode, ConfigLoaderImpl.load_configuration

    def get_mode(self, config_name, overrides):
        token = _IN_GET_MODE.set(True)
        try:
            return whole_get_mode(self, config_name, overrides)
        finally:
            _IN_GET_MODE.reset(token)

    def load_configuration(self, config_name, overrides, run_mode, from_shell=True, validate_sweep_overrides=True):
        """Hydra's, but the multirun compose right after get_mode's (same loader, config name,
        overrides, mode, cwd) takes get_mode's config, which nothing else read or kept."""
        key = (id(self), config_name, tuple(overrides), run_mode, from_shell, os.getcwd())
        kept = _MODE_COMPOSE.pop("last", None)
        mode_line = f"hydra.mode={run_mode.name}"  # (what _run_app appends when the config sets no mode)
        if (kept is not None and not _IN_GET_MODE.get() and run_mode == RunMode.MULTIRUN
                and key == kept[0][:2] + (kept[0][2] + (mode_line,),) + kept[0][3:]):
            parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
            if validate_sweep_overrides:  # (get_mode's compose skipped this check)
                self.validate_sweep_overrides_legal(overrides=parsed, run_mode=run_mode, from_shell=from_shell)
            cfg = kept[1]  # Hydra's last steps for the one override more: its value, then its line
            ConfigLoaderImpl._apply_overrides_to_config(parsed[-1:], cfg)
            cfg.hydra.overrides.hydra.append(mode_line)
            return cfg
        cfg = whole_load(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
        if _IN_GET_MODE.get() and run_mode == RunMode.MULTIRUN:
            _MODE_COMPOSE["last"] = (key, cfg)
        return cfg

    for fn in (load_sweep_config, parse_overrides, create_defaults_list, compose_config_from_defaults_list,
               parse_overrides_and_create_caching_repo, load_configuration_impl, get_mode, load_configuration):
        fn._kvbench = True
    Hydra.get_mode = get_mode
    ConfigLoaderImpl.load_configuration = load_configuration
    ConfigLoaderImpl._load_configuration_impl = load_configuration_impl
    ConfigLoaderImpl._parse_overrides_and_create_caching_repo = parse_overrides_and_create_caching_repo
    ConfigLoaderImpl.load_sweep_config = load_sweep_config
    ConfigLoaderImpl._compose_config_from_defaults_list = compose_config_from_defaults_list
    OverridesParser.parse_overrides = parse_overrides
    cli_mod.create_defaults_list = create_defaults_list
