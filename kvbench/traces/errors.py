"""The one exception every trace loader and generator raises for bad input."""
from __future__ import annotations


class TraceError(ValueError):
    """Bad trace input: a malformed row, a missing file, an impossible parameter.

    Messages of a bad file say where, on one line: ``<path>:<line>: <field>: <reason>``
    (``row`` or ``header`` for the field when no single field is to blame).
    """


def shown(value: object, width: int = 80) -> str:
    """repr(value), cut to `width` characters: a 100k-character field stays a one-line error."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def row_error(where: str, field: str, expected: str, got: object) -> TraceError:
    """``where: F: expected E, got 'G'`` — the uniform message for one bad field."""
    return TraceError(f"{where}: {field}: expected {expected}, got {shown(got)}")
