"""Local files that appear only complete: written under a temporary sibling name, then renamed.

A reader (another rank, a colleague, a resume) never sees half a file, and the file gets the mode the
umask gives a new file, as a plain ``open(path, "w")`` would: a temporary file made private (safetensors
and ``tempfile`` create theirs 0600) must not stay private through the rename.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: PathLike, path: PathLike) -> None:
    """Give ``tmp`` the umask's mode for a new file and rename it to ``path`` (atomic on one file system)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: PathLike, keep_extension: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it becomes ``path``, on any error
    (a kill, a full disk) it is removed and ``path`` is left as it was. ``keep_extension``: the temporary
    name ends as ``path`` does (matplotlib and safetensors look at it); else it ends in ``.tmp-XXXX``, so a
    reader that lists ``*.tar`` (fsspec's glob shows dot files) never picks up a shard being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".{path.stem}.tmp-{tag}{path.suffix}" if keep_extension else f"{path.name}.tmp-{tag}")
    try:
        yield tmp
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
