"""A run's timeline streamed to a parquet file in row groups while the run goes, so a run holds
one chunk of rows, not all of them (10^7 synthetic requests: ~1.7*10^8 steps, 19 GB as a frame).

    Recorder ──append(columns)──► <dir>/.timeline.parquet.tmp<pid>.rows   (one row group each)
    close() ──► [name]: one whole column read back (the summary's sums are numpy's on it)
    move_to(tmp) ──► run.py's write_atomic fsyncs tmp and renames it to timeline.parquet

The file has the schema (pandas metadata included) that `DataFrame.to_parquet(index=False)` of
the whole timeline writes, so every reader gets the same frame. It is never the run's output
until renamed; on an error (or when not moved) the context manager removes it, and a later run
of the dir removes a stale one (its name matches run.py's `.*.tmp*`).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@functools.lru_cache(maxsize=8)
def _schema(dtypes: tuple[tuple[str, np.dtype], ...]) -> pa.Schema:
    """The parquet schema (with pandas metadata) of a frame of these columns; kept (immutable)."""
    empty = pd.DataFrame({k: np.empty(0, v) for k, v in dtypes})
    return pa.Schema.from_pandas(empty, preserve_index=False)


class TimelineFile:
    """Rows appended in column chunks; read back by column once closed. Mutates its file only."""

    def __init__(self, path: Path, dtypes: dict[str, np.dtype]) -> None:
        self.path = Path(path)
        self.dtypes = {k: np.dtype(v) for k, v in dtypes.items()}
        self.schema = _schema(tuple(self.dtypes.items()))
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, self.schema, compression="snappy")
        self.rows, self._moved = 0, False
        self._reader: pq.ParquetFile | None = None  # the closed file, opened once for every column read

    def append(self, columns: dict[str, np.ndarray]) -> None:
        """One row group: `columns` holds every column, equal lengths (cast to the file's dtypes)."""
        arrays = [pa.array(np.asarray(columns[k], dtype=t)) for k, t in self.dtypes.items()]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += len(arrays[0])

    def close(self) -> None:
        """Write the footer; the file is then complete (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, name: str) -> np.ndarray:
        """The whole column `name` [rows], read one row group at a time into one array."""
        self.close()
        if self._reader is None:
            self._reader = pq.ParquetFile(self.path)
        f = self._reader
        out, pos = np.empty(self.rows, self.dtypes[name]), 0
        for g in range(f.num_row_groups):
            part = f.read_row_group(g, columns=[name]).column(0).to_numpy()
            out[pos:pos + len(part)] = part
            pos += len(part)
        return out

    def frame(self) -> pd.DataFrame:
        """The whole timeline as one frame (as `pd.read_parquet` of the final file gives it)."""
        self.close()
        return pd.read_parquet(self.path)

    def move_to(self, path: Path) -> None:
        """Rename the closed file to `path` (run.py's write_atomic then renames that into place)."""
        self.close()
        self._reader = None
        os.replace(self.path, path)
        self.path, self._moved = Path(path), True

    def discard(self) -> None:
        """Remove the file, unless it was moved away (then it is no longer this object's)."""
        self._reader = None
        if self._moved:
            return
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # a writer that failed half-way: the file goes anyway
                pass
            self._writer = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> TimelineFile:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
