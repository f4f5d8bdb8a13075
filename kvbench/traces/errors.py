"""The one exception every trace loader and generator raises for bad input."""
from __future__ import annotations


class TraceError(ValueError):
    """Bad trace input: a malformed row, a missing file, an impossible parameter.

    Messages say where (``file:line: field 'x'``), what was wrong, and what to do.
    """


def row_error(where: str, field: str, expected: str, got: object) -> TraceError:
    """``where: field 'F': expected E, got 'G'`` — the uniform message for one bad field."""
    return TraceError(f"{where}: field {field!r}: expected {expected}, got {got!r}")
