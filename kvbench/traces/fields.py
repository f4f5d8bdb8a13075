"""Parsing of single fields of a trace row, with errors that name file, line and field."""
from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

from kvbench.traces.errors import TraceError, row_error


def csv_rows(path: Path, required: tuple[str, ...], expected: tuple[str, ...]) -> Iterator[tuple[str, list[str], dict[str, int]]]:
    """(\"file:line\", fields, column index by name) of every non-blank data row of a CSV whose
    header has the `required` columns; a missing column or a row of the wrong width is an error
    naming the file and line (`expected` is the header to show in the message)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise TraceError(f"{path.name}:1: missing column(s) {missing}; header is {header}, "
                             f"expected {list(expected)}")
        col = {c: header.index(c) for c in required}
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            where = f"{path.name}:{reader.line_num}"
            if len(row) != len(header):
                raise TraceError(f"{where}: expected {len(header)} fields {header}, got {len(row)}: {row}")
            yield where, row, col


def parse_int(text: str, where: str, field: str, minimum: int) -> int:
    """A decimal integer >= minimum from CSV text ('12', ' 12 '; not '1.5', not 'abc')."""
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        value = int(text.strip())
    except (ValueError, AttributeError):
        raise row_error(where, field, expected, text) from None
    if value < minimum:
        raise row_error(where, field, expected, text)
    return value


def parse_seconds(text: str, where: str, field: str) -> float:
    """A finite number of seconds >= 0 from CSV text ('3', '3.25')."""
    try:
        value = float(text.strip())
    except (ValueError, AttributeError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise row_error(where, field, "a number of seconds >= 0", text)
    return value


def json_int(obj: dict, where: str, field: str, minimum: int) -> int:
    """An integer field >= minimum of a decoded JSON object (bools and floats are rejected)."""
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if field not in obj:
        raise row_error(where, field, expected, "<missing>")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise row_error(where, field, expected, value)
    return value


def json_number(obj: dict, where: str, field: str) -> float:
    """A finite number >= 0 of a decoded JSON object (int or float, not bool)."""
    expected = "a number >= 0"
    if field not in obj:
        raise row_error(where, field, expected, "<missing>")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise row_error(where, field, expected, value)
    if not math.isfinite(value) or value < 0:
        raise row_error(where, field, expected, value)
    return float(value)
