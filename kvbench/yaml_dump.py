"""OmegaConf.to_yaml's text of a plain container, put together from one dump per key and kept
per process (issue 13 §5: a sweep's job writes four yaml files, ~10 ms of PyYAML's pure-Python
emitter, of mostly the same lines as the job before).

`to_yaml(container)` is `yaml.dump(container, default_flow_style=False, allow_unicode=True,
sort_keys=False, Dumper=OmegaConf's dumper)`, what OmegaConf.to_yaml writes for the container it
makes (`to_container(cfg, resolve=..., enum_to_str=True)`). Each top-level key (or, with
`under="hydra"`, each key of the one top-level mapping) is dumped alone, in the same nesting, so
with the same columns and line wrapping, and kept by the repr of its value: the jobs of a sweep
differ in a few keys (trace.rate, hydra.job, hydra.runtime), so most pieces are dumped once per
process. A piece that ends its document ('...') or uses an anchor (an object met twice) falls back
to the whole dump; the first text a process makes of each kind is compared with the whole dump,
and a difference turns the pieces off for that kind in this process.
"""
from __future__ import annotations

from typing import Any

_PIECES: dict[tuple[Any, str, str], str] = {}  # (under, key, repr of its value) -> its lines
_CHECKED: dict[Any, bool] = {}  # under -> whether the pieces matched a whole dump (once per process)
_MAX_PIECES = 4096


def whole_yaml(container: Any) -> str:
    """OmegaConf.to_yaml's dump of a container it made (to_container, enum_to_str)."""
    import yaml
    from omegaconf._utils import get_omega_conf_dumper

    return yaml.dump(container, default_flow_style=False, allow_unicode=True, sort_keys=False,
                     Dumper=get_omega_conf_dumper())


def to_yaml(container: dict, under: str | None = None) -> str:
    """whole_yaml(container) (with `under`: whole_yaml({under: container})) from kept pieces."""
    whole = (lambda: whole_yaml(container)) if under is None else (lambda: whole_yaml({under: container}))
    if not isinstance(container, dict) or not container or _CHECKED.get(under) is False:
        return whole()
    head = "" if under is None else f"{under}:\n"
    parts = [head]
    for key, value in container.items():
        memo = (under, key, repr(value))
        piece = _PIECES.get(memo)
        if piece is None:
            text = whole_yaml({key: value} if under is None else {under: {key: value}})
            if not text.startswith(head) or text.endswith("...\n") or "&id" in text:
                return whole()
            if len(_PIECES) >= _MAX_PIECES:
                _PIECES.clear()
            piece = _PIECES[memo] = text[len(head):]
        parts.append(piece)
    text = "".join(parts)
    if under not in _CHECKED:  # the first time: the whole dump too, compared
        _CHECKED[under] = text == whole()
        if not _CHECKED[under]:
            return whole()
    return text


def memo_scalar_analysis() -> None:
    """PyYAML's Emitter.analyze_scalar (a function of the scalar and allow_unicode only) kept per
    string in this process: a job dumps four yaml files of mostly the same strings. Mutates
    yaml.emitter.Emitter, once."""
    from yaml.emitter import Emitter

    whole = Emitter.analyze_scalar
    if getattr(whole, "_kvbench", False):
        return
    memo: dict[tuple[str, bool], Any] = {}

    def analyze_scalar(self, scalar):
        key = (scalar, bool(self.allow_unicode))
        got = memo.get(key)
        if got is None:
            if len(memo) >= 65536:
                memo.clear()
            got = memo[key] = whole(self, scalar)
        return got

    analyze_scalar._kvbench = True
    Emitter.analyze_scalar = analyze_scalar
