"""fsspec access to any URL (local path, file://, s3://, gs://, az://, memory://) with atomic writes."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from typing import IO, Iterator, Optional

import fsspec
from fsspec.core import url_to_fs

from distssl.errors import DamagedFile, MissingCredentials, MissingExtra
from distssl.storage import atomic

log = logging.getLogger(__name__)
_SECRET_IN_URL = re.compile(r"(://)([^/@:]+):([^/@]+)@")


def redact(url: str) -> str:
    """Hide credentials embedded in a URL before it is printed or written anywhere."""
    return _SECRET_IN_URL.sub(r"\1***:***@", str(url))


def _gcs_emulator_settings(url: str) -> None:
    """gcsfs 2026.x probes each bucket's type over gRPC at first use, which a GCS emulator does not answer
    (60 s time-outs per call): with an emulator (STORAGE_EMULATOR_HOST) turn the probe off before gcsfs is
    imported. A real account (no emulator variable) is left as gcsfs sets it up."""
    if url.startswith(("gs://", "gcs://")) and os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "adl": "azure"}  # a URL scheme -> the distssl extra that installs its filesystem
CREDENTIAL_CHAINS = {
    "s3": "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / ~/.aws/credentials, or the instance's role "
          "(AWS_ENDPOINT_URL for an S3-compatible store)",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`, or the instance's service "
           "account (STORAGE_EMULATOR_HOST for an emulator)",
    "azure": "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with a key, SAS token or managed "
             "identity",
}
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                   "CredentialUnavailableError", "ClientAuthenticationError")


def scheme_of(url: str) -> str:
    return str(url).split("://", 1)[0].lower() if "://" in str(url) else "file"


def filesystem(url: str):
    """(fs, path) for ``url``; local paths stay local. A store whose filesystem package is not installed is a
    MissingExtra naming the URL and the ``pip install "distssl[...]"`` that brings it."""
    _gcs_emulator_settings(str(url))
    try:
        return url_to_fs(str(url))
    except ImportError:
        scheme = scheme_of(url)
        extra = EXTRAS.get(scheme)
        if extra is None:
            raise
        raise MissingExtra(f"{redact(url)}: {scheme}:// needs the [{extra}] extra, which is not installed: "
                           f'pip install "distssl[{extra}]"') from None


def no_credentials(e: BaseException, url: str) -> Optional[MissingCredentials]:
    """``e`` as MissingCredentials when the store said it has no credentials (never worth a retry), else None."""
    names = {c.__name__ for c in type(e).__mro__}
    if not names & set(_NO_CREDENTIALS):
        return None
    chain = CREDENTIAL_CHAINS.get(EXTRAS.get(scheme_of(url), ""), "the store's credential variables")
    return MissingCredentials(f"{redact(url)}: no credentials for it were found ({type(e).__name__}); set {chain}")


def check_access(url: str) -> None:
    """One quick look at a remote ``url`` before a run starts: a missing extra or missing credentials are
    the user's to fix and raised at once (MissingExtra / MissingCredentials); anything else (not there yet, a
    passing outage) is left to the reads that follow, with their retries."""
    fs, path = filesystem(url)
    if is_local(fs):
        return
    try:
        fs.info(path)
    except Exception as e:  # noqa: BLE001 - only the credential refusal is decided here
        err = no_credentials(e, url)
        if err is not None:
            raise err from None


_MAKE_BUCKET = {"s3": "aws s3 mb s3://{b}", "gs": "gcloud storage buckets create gs://{b}",
                "gcs": "gcloud storage buckets create gs://{b}", "az": "az storage container create -n {b}",
                "abfs": "az storage container create -n {b}"}


def check_bucket(url: str) -> None:
    """An object-store destination whose bucket (container) does not exist is named, with how to create it,
    instead of the store's bare 404 (``b/shards/o`` from GCS); distssl does not create buckets (project,
    region and access are the owner's choices)."""
    fs, path = filesystem(url)
    if is_local(fs) or "://" not in str(url):
        return
    scheme, bucket = str(url).split("://", 1)[0], path.split("/", 1)[0]
    try:
        fs.info(bucket)  # not exists(): s3fs answers False for an unreachable store too
        return
    except FileNotFoundError:
        pass
    except Exception:  # unreachable, or no permission to look: the build's own reads say what is wrong
        return
    how = _MAKE_BUCKET.get(scheme, "create it with your store's tools").format(b=bucket)
    raise ValueError(f"{redact(url)}: the bucket {scheme}://{bucket} does not exist (or these credentials "
                     f"cannot see it): create it first ({how}), or check the endpoint/credential variables")


def join(base: str, *parts: str) -> str:
    base = str(base).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return retry(fs.cat_file, path, what=url)


def read_json(url: str, fix: str, gzipped: bool = False):
    """A JSON file we (or a tool before us) wrote: one that does not parse (cut short by a kill, copied in
    part) is a :class:`DamagedFile` naming it and ``fix``, not a JSONDecodeError from deep inside."""
    data = read_bytes(url)
    try:
        if gzipped:
            import gzip

            data = gzip.decompress(data)
        return json.loads(data)
    except (ValueError, EOFError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedFile(f"{redact(url)} is damaged ({len(data)} bytes that do not parse as "
                          f"{'gzipped ' if gzipped else ''}JSON: {e}): {fix}") from None


def is_local(fs) -> bool:
    return fs.__class__.__name__ == "LocalFileSystem"


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """A reader never sees a half-written file: locally we write a temporary sibling and rename it;
    object stores (S3, GCS, Azure, memory) publish an object only when its upload completes (an aborted
    upload is discarded: S3 multipart, GCS resumable and Azure block uploads are never committed)."""
    fs, path = filesystem(url)
    if not is_local(fs):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException as e:
            # closing would publish what was written so far: abort the upload instead
            discard = getattr(f, "discard", None)
            if callable(discard):
                with contextlib.suppress(Exception):
                    discard()
            f.closed = True  # or its finaliser would try to publish it again
            err = as_store_error(e, url)
            if err is e:
                raise
            raise err from e
        try:
            f.close()  # the upload completes (or its last part goes) here
        except Exception as e:
            err = as_store_error(e, url)
            if err is e:
                raise
            raise err from e
        return
    with atomic.atomic_path(path, keep_extension=False) as tmp, open(tmp, "wb") as f:
        yield f


_CLIENT_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "adlfs", "azure", "fsspec",
                     "requests", "urllib3")


def as_store_error(e: BaseException, url: str) -> BaseException:
    """A client library's own error (botocore's EndpointConnectionError, aiohttp's, Azure's...) while
    writing ``url`` as an OSError naming it, the one type callers handle; anything else as it is."""
    if isinstance(e, OSError) or not isinstance(e, Exception):
        return e
    if type(e).__module__.split(".")[0] not in _CLIENT_LIBRARIES:
        return e
    return OSError(f"{redact(url)}: the store failed while writing ({type(e).__name__}: {e})")


def retry(fn, *args, attempts: Optional[int] = None, base_delay: float = 0.5, what: str = "", **kwargs):
    """Call ``fn`` with exponential back-off on transient errors (a missing or forbidden key is final).
    ``attempts`` defaults to $DISTSSL_IO_ATTEMPTS or 6 (about 15 s of back-off)."""
    attempts = attempts or int(os.environ.get("DISTSSL_IO_ATTEMPTS", "6"))
    delay = base_delay
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception as e:  # network errors come as many types (OSError, botocore, aiohttp)
            missing = no_credentials(e, what or str(args[:1]))
            if missing is not None:  # not an outage: no retry can find credentials
                raise missing from None
            if i == attempts - 1:
                if isinstance(e, OSError):
                    raise
                # one type for callers to handle, whatever client library failed
                raise OSError(f"{redact(what or str(args[:1]))}: still failing after {attempts} attempts "
                              f"({type(e).__name__}: {e})") from e
            log.warning("%s: %s: %s; retrying in %.1fs", redact(what or str(args[:1])), type(e).__name__, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url) as f:
        f.write(data)


def open_stream(url: str) -> IO[bytes]:
    """Open a shard for sequential reading (fsspec, no shell ``pipe:`` commands)."""
    fs, path = filesystem(url)
    if is_local(fs):
        return open(path, "rb", buffering=1024 * 1024)
    return retry(fs.open, path, "rb", block_size=4 * 1024 * 1024, cache_type="readahead", what=url)


__all__ = ["redact", "filesystem", "check_bucket", "join", "exists", "read_bytes", "atomic_write", "write_bytes",
           "open_stream", "read_json", "retry", "is_local", "fsspec"]
