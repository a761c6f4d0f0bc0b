"""A lean reader of tar streams: WebDataset shards are plain tars, read sequentially from any store.

Headers are parsed by hand (ustar, GNU long names, pax path records; checksums checked): Python's
tarfile builds a TarInfo per member and costs a noticeable share of a decode + augment; the two are
compared in docs/benchmarks.md. A bad or cut header raises ``tarfile.ReadError``.
"""
from __future__ import annotations

import tarfile
from typing import Callable, Iterator, Optional


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for big sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:  # not a number where a header keeps one: the block is not a tar header
        raise tarfile.ReadError(f"bad tar header (damaged shard): {bytes(text[:12])!r} is not an octal "
                                f"number") from None


_ZERO_BLOCK = b"\0" * 512


def tar_members(f, keep: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[str, Optional[bytes]]]:
    """(name, data) of every regular file in a tar stream; a bad or cut header raises tarfile.ReadError.
    With ``keep``, the data of members it refuses is not read where the stream can seek (their data is
    None): an index of a shard reads its headers only. A member cut short by the end of the file then
    shows as a position past the end, which the caller checks against the file's size."""
    long_name: Optional[str] = None
    seekable = keep is not None and getattr(f, "seekable", lambda: False)()
    while True:
        header = f.read(512)
        if len(header) < 512:
            if not header:
                return  # no end-of-archive blocks: accept, as tarfile does
            raise tarfile.ReadError("unexpected end of data (truncated tar header)")
        if header == _ZERO_BLOCK:
            return
        checksum_field = header[148:156]
        # the checksum counts its own 8 bytes as spaces (8 * 32 = 256)
        if _octal(checksum_field) != sum(header) - sum(checksum_field) + 256:
            raise tarfile.ReadError("bad tar header checksum (damaged shard)")
        size, kind = _octal(header[124:136]), header[156:157]
        pad = -size % 512
        if kind in (b"L", b"x"):  # GNU long name / pax records for the next member: small, always read
            data = _read_exactly(f, size, pad)
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:  # "len key=value\n" records
                for rec in data.decode("utf-8", "replace").splitlines():
                    key, _, value = rec.partition(" ")[2].partition("=")
                    if key == "path":
                        long_name = value
            continue
        if kind not in (b"0", b"\0", b""):
            _skip(f, size + pad, seekable)
            long_name = None
            continue  # directories, links, global pax headers
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                if prefix:
                    name = f"{prefix}/{name}"
        long_name = None
        if keep is not None and not keep(name):
            _skip(f, size + pad, seekable)
            yield name, None
            continue
        yield name, _read_exactly(f, size, pad)


def _read_exactly(f, size: int, pad: int) -> bytes:
    data = f.read(size)
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of data (truncated tar member)")
    if pad and len(f.read(pad)) < pad:
        raise tarfile.ReadError("unexpected end of data (truncated tar padding)")
    return data


def _skip(f, n: int, seekable: bool) -> None:
    if seekable:
        f.seek(n, 1)
        return
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data (truncated tar member)")
        n -= len(chunk)


def webdataset_members(f) -> Iterator[tuple[str, bytes]]:
    """The same (name, data) pairs through webdataset's own tar stage (``tar_file_iterator``, Python's
    tarfile underneath). Not the default: tools/bench/stream.py measures what it costs per sample
    against :func:`tar_members` (docs/benchmarks.md)."""
    from webdataset.tariterators import tar_file_iterator

    for sample in tar_file_iterator(f):
        yield sample["fname"], sample["data"]
