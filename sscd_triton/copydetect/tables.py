"""CSV or Parquet tables by the file name's extension, written atomically."""
from __future__ import annotations

import csv
import io

import numpy as np

from sscd_triton.files import write_atomic

FORMATS = (".csv", ".parquet")


def score_text(scores: np.ndarray) -> list[str]:
    """float32 scores as the shortest text that reads back to the same float32."""
    return [str(s) for s in np.asarray(scores, np.float32)]


def text_writer(write_rows):
    """A write_atomic callable: `write_rows(csv_writer)` into the binary file as UTF-8."""
    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        write_rows(csv.writer(text))
        text.flush()
        text.detach()
    return write


def write_table(path: str, columns: dict) -> None:
    """Columns (name -> list/array) as CSV or Parquet by the extension, atomically."""
    if path.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: pa.array(list(v), pa.string()) if v.dtype == object else pa.array(v)
                          for k, v in columns.items()})
        write_atomic(path, lambda f: pq.write_table(table, f))
        return
    names = list(columns)

    def rows(w):
        w.writerow(names)
        cols = [score_text(v) if v.dtype == np.float32 else v.tolist()
                for v in columns.values()]
        w.writerows(zip(*cols))

    write_atomic(path, text_writer(rows))
