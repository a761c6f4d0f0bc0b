"""Where Ray keeps a sweep's state, trial results and checkpoints: a local folder, or any fsspec URL."""
from __future__ import annotations

import os
from pathlib import Path


def storage_for(url: str, sweep_dir: str):
    """(path, pyarrow filesystem or None) for Ray's storage: a local folder, or any fsspec URL through
    pyarrow's fsspec handler (so S3-compatible endpoints, gs:// and the rest work as for the data)."""
    if not url:
        return str(Path(sweep_dir) / "ray"), None
    if "://" not in url or url.startswith("file://"):
        return os.path.abspath(url.removeprefix("file://")), None
    import pyarrow.fs
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
