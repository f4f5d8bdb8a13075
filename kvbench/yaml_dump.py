"""OmegaConf.to_yaml's text of a plain container, put together from one dump per key and kept
per process (issue 13 §5: a sweep's job writes four yaml files, ~10 ms of PyYAML's pure-Python
emitter, of mostly the same lines as the job before).

`to_yaml(container)` is `yaml.dump(container, default_flow_style=False, allow_unicode=True,
sort_keys=False, Dumper=OmegaConf's dumper)`, what OmegaConf.to_yaml writes for the container it
makes (`to_container(cfg, resolve=..., enum_to_str=True)`). A block mapping's text is its keys'
entries one after the other, each at its own indent, so each entry is dumped alone in the same
nesting (so with the same columns and line wrapping) and kept by its path and the repr of its
value: the jobs of a sweep differ in a few values (trace.rate, hydra.job.num,
hydra.runtime.output_dir), so most entries are dumped once per process. A mapping that is not
kept is split into its own entries (to a depth of MAX_DEPTH), behind its key's line. An entry
whose dump ends its document ('...') or uses an anchor (an object met twice) falls back to the
whole dump; the first text a process makes of each kind is compared with the whole dump, and a
difference turns the pieces off for that kind in this process.
"""
from __future__ import annotations

from typing import Any

MAX_DEPTH = 3  # a mapping this deep is dumped whole (hydra.runtime.choices: depth 3)
_PIECES: dict[tuple[tuple, str], str] = {}  # (path of keys, repr of the value) -> its entry's lines
_HEADS: dict[tuple, str] = {}  # path -> the line of its key above a block mapping
_CHECKED: dict[Any, bool] = {}  # under -> whether the pieces matched a whole dump (once per process)
_MAX_PIECES = 8192


class _Whole(Exception):
    """A piece that cannot stand alone: dump the whole container instead."""


def whole_yaml(container: Any) -> str:
    """OmegaConf.to_yaml's dump of a container it made (to_container, enum_to_str)."""
    import yaml
    from omegaconf._utils import get_omega_conf_dumper

    return yaml.dump(container, default_flow_style=False, allow_unicode=True, sort_keys=False,
                     Dumper=get_omega_conf_dumper())


def _nested(path: tuple, value: Any) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def _alone(path: tuple, value: Any) -> str:
    """The lines of the entry path[-1]: value dumped in its nesting, the keys above it left out."""
    text = whole_yaml(_nested(path, value))
    if text.endswith("...\n") or "&id" in text:
        raise _Whole
    lines = text.splitlines(keepends=True)
    return "".join(lines[len(path) - 1:])


_LAYOUT: dict[tuple, tuple[str, str] | None] = {}  # path -> (its key's text, a list item's) or None: no fast path
_PLAIN: dict[str, bool] = {}  # string -> whether it is dumped plain, on one line, as it is
_DUMPER: list = []


def _plain(value: Any) -> str | None:
    """The scalar's text when the dumper writes it plain as it is, on one line whatever the width:
    an int >= 0 (its str), or a nonempty printable ASCII string without spaces that OmegaConf
    does not quote (no bool, int or float look-alike), that resolves to a string and that PyYAML's
    own analysis allows plain in a block; else None."""
    if type(value) is int:
        return str(value) if value >= 0 else None
    if type(value) is not str:
        return None
    got = _PLAIN.get(value)
    if got is None:
        got = False
        if value and value.isascii() and value.isprintable() and " " not in value:
            import io

            import yaml
            from omegaconf._utils import get_omega_conf_dumper, is_float, is_int, yaml_is_bool

            if not _DUMPER:
                _DUMPER.append(get_omega_conf_dumper()(io.StringIO(), default_flow_style=False, allow_unicode=True,
                                                       sort_keys=False))
            dumper = _DUMPER[0]
            if not (yaml_is_bool(value) or is_int(value) or is_float(value)) and \
                    dumper.resolve(yaml.ScalarNode, value, (True, False)) == yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG:
                analysis = dumper.analyze_scalar(value)
                got = not analysis.empty and not analysis.multiline and analysis.allow_block_plain
        if len(_PLAIN) >= 65536:
            _PLAIN.clear()
        _PLAIN[value] = got
    return value if got else None


def _fast(path: tuple, value: Any) -> str | None:
    """The entry of a plain scalar, or of a nonempty list of them, from its path's layout (its
    key's text, a list item's indent), learnt from the first such value dumped there and checked
    against that dump: a sweep's jobs differ in such values (hydra.job.num, hydra.job.id,
    hydra.job.override_dirname, hydra.runtime.output_dir, hydra.overrides.task, trace.rate),
    each a new value. None: no fast path (the caller dumps it)."""
    if isinstance(value, list):
        texts = [_plain(v) for v in value]
        if not texts or None in texts:
            return None
    else:
        texts = _plain(value)
        if texts is None:
            return None
    kind = path + (isinstance(value, list),)
    layout = _LAYOUT.get(kind, False)
    if layout is False:  # learn it from this value's dump
        layout = None
        text = _alone(path, value)
        if isinstance(value, list):
            lines = text.splitlines(keepends=True)
            if len(lines) == len(texts) + 1 and lines[0].endswith(":\n") and "- " in lines[1]:
                layout = (lines[0], lines[1][:lines[1].index("- ") + 2])
        elif text.endswith(f" {texts}\n") and "\n" not in text[:-1]:
            layout = (text[:-len(texts) - 1], "")
        if layout is not None and _laid_out(layout, texts) != text:
            layout = None
        _LAYOUT[kind] = layout
    return None if layout is None else _laid_out(layout, texts)


def _laid_out(layout: tuple[str, str], texts: str | list[str]) -> str:
    if isinstance(texts, list):
        return layout[0] + "".join(f"{layout[1]}{t}\n" for t in texts)
    return f"{layout[0]}{texts}\n"


def _entry(path: tuple, value: Any) -> str:
    memo = (path, repr(value))
    piece = _PIECES.get(memo)
    if piece is None and (piece := _fast(path, value)) is not None:
        return piece
    if piece is None:
        if isinstance(value, dict) and value and len(path) < MAX_DEPTH and all(isinstance(k, str) for k in value):
            if path not in _HEADS:  # the key's own line, as above any block mapping
                head = _alone(path, {"x": 0}).splitlines(keepends=True)[0]
                if not head.endswith(":\n") or head.lstrip().startswith("?"):
                    raise _Whole
                _HEADS[path] = head
            piece = _HEADS[path] + "".join(_entry((*path, k), v) for k, v in value.items())
        else:
            piece = _alone(path, value)
        if len(_PIECES) >= _MAX_PIECES:
            _PIECES.clear()
        _PIECES[memo] = piece
    return piece


def to_yaml(container: dict, under: str | None = None) -> str:
    """whole_yaml(container) (with `under`: whole_yaml({under: container})) from kept pieces."""
    whole = (lambda: whole_yaml(container)) if under is None else (lambda: whole_yaml({under: container}))
    if not isinstance(container, dict) or not container or _CHECKED.get(under) is False \
            or not all(isinstance(k, str) for k in container):
        return whole()
    try:
        if under is None:
            text = "".join(_entry((k,), v) for k, v in container.items())
        else:
            text = f"{under}:\n" + "".join(_entry((under, k), v) for k, v in container.items())
    except _Whole:
        return whole()
    if under not in _CHECKED:  # the first time: the whole dump too, compared
        _CHECKED[under] = text == whole()
        if not _CHECKED[under]:
            return whole()
    return text


def list_yaml(items: list) -> str:
    """whole_yaml(items) of a top-level list (Hydra's overrides.yaml): a nonempty list of plain
    scalars (`_plain`) is its '- item' lines; the first such text a process makes is compared
    with the whole dump (a difference turns this off in the process)."""
    texts = [_plain(v) for v in items] if isinstance(items, list) else [None]
    if not texts or None in texts or _CHECKED.get("[]") is False:
        return whole_yaml(items)
    text = "".join(f"- {t}\n" for t in texts)
    if "[]" not in _CHECKED:
        _CHECKED["[]"] = text == whole_yaml(items)
        if not _CHECKED["[]"]:
            return whole_yaml(items)
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
