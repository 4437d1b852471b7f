"""Object storage: one place that turns a URI into an fsspec filesystem with sane retries/timeouts.

Any fsspec URI works (a local folder, ``s3://bucket/prefix``, ``gs://`` with gcsfs, ...). For S3,
the endpoint comes from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, so any
S3-compatible store works; credentials come from the usual AWS chain and are never passed through
here, printed or stored.
"""

from __future__ import annotations

import os

import fsspec

# Bounded failure on an unreachable store: botocore connects with a 5 s timeout and tries 3 times
# in standard mode, s3fs re-tries whole requests on transient errors (DATA.md §1.1, §5).
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 3, "mode": "standard"}}
S3_RETRIES = 3


class StorageError(RuntimeError):
    """The object store could not be reached or answered with an error."""


def s3_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint to use: the flag, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def open_fs(uri: str, endpoint: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``uri``; S3 gets the endpoint, retries and timeouts."""
    uri = str(uri)
    options = {}
    if uri.startswith(("s3://", "s3a://")):
        options = {"config_kwargs": S3_CONFIG, "skip_instance_cache": True}
        if s3_endpoint(endpoint):
            options["endpoint_url"] = s3_endpoint(endpoint)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if uri.startswith(("s3://", "s3a://")):
        fs.retries = S3_RETRIES
    return fs, path.rstrip("/")


def describe(uri: str, endpoint: str | None = None) -> str:
    """A human name for where ``uri`` lives (endpoint included for S3; never credentials)."""
    ep = s3_endpoint(endpoint) if str(uri).startswith(("s3://", "s3a://")) else None
    return f"{uri} (endpoint {ep})" if ep else str(uri)


def storage_error(uri: str, endpoint: str | None, exc: BaseException, action: str) -> StorageError:
    return StorageError(f"cannot {action} {describe(uri, endpoint)}: {type(exc).__name__}: {exc}. "
                        f"Check the URI, --s3-endpoint / AWS_ENDPOINT_URL and your credentials.")


def pyarrow_fs(uri: str, endpoint: str | None = None):
    """(pyarrow S3FileSystem, bucket/path) for an s3:// URI with a custom endpoint, else None.

    Ray's storage_path resolves plain s3:// URIs itself but ignores AWS_ENDPOINT_URL, so an
    S3-compatible endpoint is passed as a filesystem object (RAY.md §1.5, DATA.md §1.1).
    """
    ep = s3_endpoint(endpoint)
    if not (str(uri).startswith("s3://") and ep):
        return None
    import pyarrow.fs as pafs

    scheme, _, host = ep.partition("://")
    fs = pafs.S3FileSystem(endpoint_override=host.rstrip("/"), scheme=scheme or "https",
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=5),
                           request_timeout=30, connect_timeout=5)
    return fs, str(uri)[len("s3://"):].rstrip("/")
