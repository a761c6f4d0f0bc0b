"""Reading the builder's inputs: files by URL, and images embedded in a Parquet table.

An input is named by its URL. An image held in a Parquet table (a ``datasets`` export's
``{bytes, path}`` struct column, or a plain binary column) is named ``TABLE.parquet#row=N``: the
table is read a row group at a time, never whole. A row group is the smallest part Parquet can
read, so one image costs its whole group: :func:`read_many` (a shard's inputs) reads each group
it needs once and keeps only the rows it wants, and single reads (verification, hashing) go
through a small per-process cache of the last groups read.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Union

from distssl.storage import store

READ_THREADS = 16  # reads of separate files overlap (object stores answer one GET at a time with latency)
ROW = "#row="
_CACHED_GROUPS = 2
_lock = threading.Lock()
_groups: "OrderedDict[tuple[str, int], list]" = OrderedDict()
_tables: dict[str, "EmbeddedTable"] = {}


def embedded_ref(table_url: str, row: int) -> str:
    return f"{table_url}{ROW}{row}"


def split_ref(url: str) -> Optional[tuple[str, int]]:
    """(table URL, row) for an image embedded in a Parquet table, else None."""
    table, sep, row = url.rpartition(ROW)
    if not sep or not table.lower().endswith(".parquet") or not row.isdigit():
        return None
    return table, int(row)


def image_column(schema) -> Optional[str]:
    """The column holding the images: ``image``/``img``/``jpg``/``png`` or else the first column that is
    binary or a struct with a binary ``bytes`` field (what ``datasets`` writes for an Image feature)."""
    import pyarrow as pa

    def holds_images(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
            and (pa.types.is_binary(t.field("bytes").type) or pa.types.is_large_binary(t.field("bytes").type)))

    candidates = [f.name for f in schema if holds_images(f.type)]
    for name in ("image", "img", "jpg", "png"):
        if name in candidates:
            return name
    return candidates[0] if candidates else None


class EmbeddedTable:
    """One Parquet table's layout: where each row group starts and which column holds the images."""

    def __init__(self, url: str):
        import pyarrow.parquet as pq

        fs, path = store.filesystem(url)
        self.url, self.file = url, pq.ParquetFile(store.retry(fs.open, path, "rb", what=url))
        meta = self.file.metadata
        self.starts = [0]
        for g in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)
        self.column = image_column(self.file.schema_arrow)
        if self.column is None:
            raise ValueError(f"{store.redact(url)} has no image column (binary, or a struct with binary 'bytes')")

    def group_of(self, row: int) -> int:
        import bisect

        if not 0 <= row < self.starts[-1]:
            raise FileNotFoundError(f"{store.redact(self.url)} has no row {row} ({self.starts[-1]} rows)")
        return bisect.bisect_right(self.starts, row) - 1

    def read_group(self, g: int) -> list:
        """The images of row group ``g``, as bytes (None where a row has none)."""
        col = self.file.read_row_group(g, columns=[self.column]).column(0).to_pylist()
        return [v.get("bytes") if isinstance(v, dict) else v for v in col]


def _table(url: str) -> EmbeddedTable:
    with _lock:
        if url not in _tables:
            _tables[url] = EmbeddedTable(url)
        return _tables[url]


def _row_bytes(table: EmbeddedTable, row: int, group: Optional[list] = None) -> bytes:
    g = table.group_of(row)
    if group is None:
        with _lock:  # one reader per group: the cache is shared by the reader threads
            key = (table.url, g)
            if key not in _groups:
                _groups[key] = table.read_group(g)
                while len(_groups) > _CACHED_GROUPS:
                    _groups.popitem(last=False)
            group = _groups[key]
    data = group[row - table.starts[g]]
    if data is None:
        raise FileNotFoundError(f"{store.redact(table.url)} row {row} holds no image bytes")
    return data


def read_input(url: str) -> bytes:
    """One input's bytes: a file, or an image embedded in a Parquet table."""
    ref = split_ref(url)
    if ref is None:
        return store.read_bytes(url)
    return _row_bytes(_table(ref[0]), ref[1])


def _read_or_error(url: str) -> Union[bytes, Exception]:
    try:
        return read_input(url)
    except Exception as e:  # noqa: BLE001 - the caller decides: a bad input is skipped, an outage is fatal
        return e


def read_many(urls: list[str]) -> Iterator[Union[bytes, Exception]]:
    """The inputs' bytes (or the exception that reading one raised) in the order given. Files are read
    by overlapping threads; embedded images a row group at a time, each group once."""
    embedded: dict[int, Union[bytes, Exception]] = {}
    wanted: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (table, group) -> [(position, row)]
    for i, url in enumerate(urls):
        ref = split_ref(url)
        if ref is None:
            continue
        try:
            table = _table(ref[0])
            wanted.setdefault((ref[0], table.group_of(ref[1])), []).append((i, ref[1]))
        except Exception as e:  # noqa: BLE001
            embedded[i] = e
    for (table_url, g), rows in sorted(wanted.items()):
        table = _table(table_url)
        try:
            group = table.read_group(g)
        except Exception as e:  # noqa: BLE001
            embedded.update((i, e) for i, _ in rows)
            continue
        for i, row in rows:
            try:
                embedded[i] = _row_bytes(table, row, group)
            except Exception as e:  # noqa: BLE001
                embedded[i] = e
    files = [u for u in urls if split_ref(u) is None]
    with ThreadPoolExecutor(READ_THREADS) as readers:
        from_files = readers.map(_read_or_error, files)
        for i, url in enumerate(urls):
            yield embedded[i] if i in embedded else next(from_files)
