"""Reading trace files line by line, and parsing single fields, strictly.

Every error is one line ``<path>:<line>: <field>: <reason>`` (``row`` or ``header`` when no
single field is to blame). Text must be UTF-8; one leading byte-order mark (as spreadsheet
exports write) is skipped; line ends may be LF or CRLF; blank lines are skipped. Numbers are
plain ASCII decimals (no ``1_000``, no ``inf``, no non-ASCII digits), within the sanity limits
of :mod:`kvbench.traces.common`, checked before anything is built from them.
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from kvbench.traces.common import MAX_ARRIVAL_S, MAX_TOKENS
from kvbench.traces.errors import TraceError, row_error, shown

_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_INT = re.compile(r"[0-9]{1,30}")
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")


def at(path: Path, line: int) -> str:
    """The location prefix of errors: ``<path>:<line>``."""
    return f"{path}:{line}"


def text_lines(path: Path, field_at: Callable[[str], str]) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its line end) of every line of a UTF-8 file, streamed.

    ``field_at(text before the bad byte)`` names the field an undecodable byte is in."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TraceError(f"{at(path, 1)}: file: cannot read it ({e.strerror})") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                if raw.startswith(_UTF16_BOMS):
                    raise TraceError(f"{at(path, 1)}: row: the file is UTF-16 (byte-order mark "
                                     f"{raw[:2].hex(' ')}); save it as UTF-8")
                raw = raw.removeprefix(_BOM)
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                before = raw[:e.start].decode("utf-8", errors="replace")
                raise TraceError(f"{at(path, line_no)}: {field_at(before)}: not UTF-8 (byte "
                                 f"0x{raw[e.start]:02x} at column {len(before) + 1}); save the "
                                 f"file as UTF-8") from None


def csv_rows(path: Path, required: tuple[str, ...], expected: tuple[str, ...]) -> Iterator[tuple[int, list[str], dict[str, int]]]:
    """(line, fields, column index by name) of every non-blank data row of a CSV whose header
    has each `required` column exactly once (`expected` is the header the message shows).

    Wrong widths, bad quoting (csv ``strict``), over-long fields and undecodable bytes are
    errors at their line. A header with no data rows yields nothing."""
    header: list[str] = []

    def field_at(before: str) -> str:
        if not header:
            return "header"
        k = before.count(",")  # the column the bad byte is in (quotes aside: a hint)
        return header[k] if k < len(header) and header[k] else f"column {k + 1}"

    lines = text_lines(path, field_at)
    reader = csv.reader((text for _, text in lines), strict=True)

    def next_row() -> list[str] | None:
        try:
            return next(reader, None)
        except csv.Error as e:
            raise TraceError(f"{at(path, reader.line_num)}: row: bad CSV ({e})") from None

    first = next_row()
    if first is None:
        raise TraceError(f"{at(path, 1)}: header: the file is empty; expected the header "
                         f"{','.join(expected)}")
    header.extend(h.strip() for h in first)
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceError(f"{at(path, 1)}: header: missing column(s) {missing}; header is "
                         f"{shown(header)}, expected {list(expected)}")
    twice = [c for c in required if header.count(c) > 1]
    if twice:
        raise TraceError(f"{at(path, 1)}: header: column(s) {twice} appear more than once")
    col = {c: header.index(c) for c in required}
    while (row := next_row()) is not None:
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise TraceError(f"{at(path, reader.line_num)}: row: expected {len(header)} fields "
                             f"{shown(header)}, got {len(row)}: {shown(row)}")
        yield reader.line_num, row, col


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line, object) of every non-blank line of a JSON-lines file. A line that is not one
    JSON object, nests too deeply, or repeats a key is an error at its line."""
    for line_no, text in text_lines(path, lambda before: "row"):
        if not text.strip():
            continue
        where = at(path, line_no)
        try:
            obj = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: row: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise TraceError(f"{where}: row: JSON nested too deeply") from None
        except _DuplicateKey as e:
            raise TraceError(f"{where}: {e.args[0]}: the key appears more than once") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise TraceError(f"{where}: row: not valid JSON ({shown(str(e))})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: row: expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _int_expected(minimum: int, maximum: int) -> str:
    return f"an integer in [{minimum}, {maximum}]"


def parse_int(text: str, where: str, field: str, minimum: int, maximum: int = MAX_TOKENS) -> int:
    """A plain decimal integer in [minimum, maximum] from CSV text ('12', ' 12 '; not '1.5',
    '1_2', '+3', 'abc'); the bound is checked before any id is built from it."""
    expected = _int_expected(minimum, maximum)
    stripped = text.strip()
    if not _INT.fullmatch(stripped):
        raise row_error(where, field, expected, text)
    value = int(stripped)
    if not minimum <= value <= maximum:
        raise row_error(where, field, expected, text)
    return value


def parse_seconds(text: str, where: str, field: str, maximum: float = MAX_ARRIVAL_S) -> float:
    """A plain decimal number of seconds in [0, maximum) from CSV text ('3', '3.25', '1e3')."""
    stripped = text.strip()
    value = float(stripped) if _DECIMAL.fullmatch(stripped) else math.nan
    if not 0 <= value < maximum:
        raise row_error(where, field, f"a decimal number of seconds in [0, {maximum:.0f})", text)
    return value


def json_int(obj: dict, where: str, field: str, minimum: int, maximum: int = MAX_TOKENS) -> int:
    """An integer field in [minimum, maximum] of a decoded JSON object (no bools, no floats)."""
    expected = _int_expected(minimum, maximum)
    if field not in obj:
        raise TraceError(f"{where}: {field}: expected {expected}, got no such key")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise row_error(where, field, expected, value)
    return value


def json_number(obj: dict, where: str, field: str, maximum: float) -> float:
    """A finite number in [0, maximum) of a decoded JSON object (int or float, not bool)."""
    expected = f"a number in [0, {maximum:.0f})"
    if field not in obj:
        raise TraceError(f"{where}: {field}: expected {expected}, got no such key")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < maximum:
        raise row_error(where, field, expected, value)  # NaN fails the range test too
    return float(value)
