"""Object storage: one place that turns a URI into a filesystem whose failures are bounded and named.

Any fsspec URI works (a local folder, ``s3://bucket/prefix``, ``gs://`` with gcsfs, ...). For S3,
the endpoint comes from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, so any
S3-compatible store works; credentials come from the usual AWS chain and are never passed through
here, printed or stored (messages are scrubbed of the secret key and session token as well).

Bounded failure
---------------
An endpoint that accepts connections but stops answering (a paused or overloaded server, a hung
proxy, a dead network path) makes every S3 operation through :func:`open_fs` fail with a
:class:`StorageError` naming the endpoint and the object **within STALL_BOUND_S = 60 s**; an
endpoint nobody listens on fails at once (connection refused). What bounds one request:

* connecting: ``CONNECT_TIMEOUT_S``;
* the answer, and every next piece of a download: ``READ_TIMEOUT_S`` of silence;
* sending a body: uploads go out without "Expect: 100-continue" (aiohttp waited for the server's
  "100 Continue" with no timeout at all: before this, every upload to a stalled endpoint hung,
  over 900 s measured), and the socket's TCP_USER_TIMEOUT (``WRITE_TIMEOUT_S``, Linux) drops a
  connection whose sent bytes stay unacknowledged, or whose receive window stays shut, that long;
* attempts: botocore makes ``BOTO_ATTEMPTS`` (standard mode: also on 5xx and throttling, with
  jittered backoff) inside each of s3fs's ``S3_RETRIES`` tries (which also cover a connection
  dropped mid-body): at most 4 attempts of ``READ_TIMEOUT_S``, ~42 s;
* backstop, whatever the platform: a request, retries included, is cancelled after
  ``REQUEST_DEADLINE_S`` plus 1 s per MB of body (so a slow but moving upload can finish;
  without TCP_USER_TIMEOUT a stalled upload of B MB therefore fails within 45 + B s);
* an operation that makes several requests (a directory upload probes the bucket first; a failed
  multipart upload is aborted) does not wait once per request: after one request gave up, the
  same filesystem object fails the others at once for ``GIVE_UP_MEMORY_S``. A new ``open_fs``
  call (a re-run) tries again.

Measured on a SIGSTOPped moto server, 13 clients at once on 2 cores (tests/test_storage_faults.py
repeats it; the old settings in brackets): listing 45 s [378], ``cat_file`` 45 [379], ``get_file``
45 [380], ``exists`` 44 [381], ``pipe`` of 1 kB 45 and of 12 MB 47 [> 900], ``open("wb")`` 45-47
[> 900], ``put`` of a folder 44 [> 900]; a download that stalls half-way adds at most one
``READ_TIMEOUT_S``.

``pyarrow_fs`` (Ray's experiment storage) uses the AWS C++ SDK: ``connect_timeout``, a
``request_timeout`` that on Linux is curl's low-speed limit (under 1 byte/s for that long aborts
the request, upload or download alike) and ``PA_ATTEMPTS`` attempts: a stalled read, listing or
upload fails in 47-49 s [157-163 s before], with pyarrow's own ``OSError`` ("AWS Error
NETWORK_CONNECTION during ... curlCode: 28, Timeout was reached"), which Ray reports.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time

import aiohttp
import botocore.exceptions
import fsspec
import s3fs
from fsspec.asyn import sync_wrapper
from s3fs.core import S3_RETRYABLE_ERRORS

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 10
WRITE_TIMEOUT_S = 10
BOTO_ATTEMPTS = 2
S3_RETRIES = 2
REQUEST_DEADLINE_S = 45
MIN_WRITE_RATE = 1_000_000  # bytes/s below which the backstop may cancel an upload (1 s per MB of body)
STALL_BOUND_S = 60
GIVE_UP_MEMORY_S = STALL_BOUND_S
PA_ATTEMPTS = 4
PA_REQUEST_TIMEOUT_S = 10

# botocore's "max_attempts" counts retries (N means N + 1 attempts); "total_max_attempts" counts attempts.
S3_CONFIG = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
             "retries": {"total_max_attempts": BOTO_ATTEMPTS, "mode": "standard"}}


class StorageError(RuntimeError):
    """The object store failed or did not answer; the message names endpoint and object, and what to do."""


def s3_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint to use: the flag, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def open_fs(uri: str, endpoint: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``uri``; S3 gets the endpoint and the bounds above."""
    uri = str(uri)
    if not _is_s3(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path.rstrip("/")
    options = {"config_kwargs": _s3_config(), "skip_instance_cache": True}
    if s3_endpoint(endpoint):
        options["endpoint_url"] = s3_endpoint(endpoint)
    fs = BoundedS3FileSystem(**options)
    return fs, fs._strip_protocol(uri).rstrip("/")


def _s3_config() -> dict:
    # A fresh dict each time: aiobotocore copies and validates it per client.
    return dict(S3_CONFIG, retries=dict(S3_CONFIG["retries"]),
                connector_args={"socket_factory": _bounded_socket, "keepalive_timeout": 12})


def _bounded_socket(addr_info) -> socket.socket:
    """A client socket whose unacknowledged sends time out (aiohttp itself never times out a write)."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    if hasattr(socket, "TCP_USER_TIMEOUT") and family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(WRITE_TIMEOUT_S * 1000))
    return sock


# ---------------------------------------------------------------------------------------------
# s3fs with a deadline per request and StorageError for transport failures
# ---------------------------------------------------------------------------------------------

# "The endpoint did not answer properly", as opposed to an S3 error reply (NoSuchKey, AccessDenied...).
TRANSPORT_ERRORS = (*S3_RETRYABLE_ERRORS, botocore.exceptions.ConnectionError, aiohttp.ClientError,
                    TimeoutError, ConnectionError)


class BoundedS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose requests end within a deadline and whose transport failures are StorageErrors.

    StorageError is not one of s3fs's retryable errors, so s3fs's outer retry loops (around
    ``cat_file`` bodies, file reads) do not multiply a request that already used its attempts.
    Once a request has given up, this filesystem object fails further requests at once for
    ``GIVE_UP_MEMORY_S``: s3fs runs some requests whose errors it swallows (bucket probes before a
    directory upload, aborting a failed multipart upload), and each would otherwise wait again.
    """

    retries = S3_RETRIES  # a class attribute, so that unpickled copies (Ray, spawned workers) keep it
    _gave_up: tuple[float, StorageError] | None = None

    async def _call_s3(self, method, *akwarglist, **kwargs):
        if self._gave_up and time.monotonic() - self._gave_up[0] < GIVE_UP_MEMORY_S:
            raise StorageError(str(self._gave_up[1]))
        body = kwargs.get("Body")
        deadline = REQUEST_DEADLINE_S + (len(body) if hasattr(body, "__len__") else 0) / MIN_WRITE_RATE
        t0 = time.monotonic()
        try:
            return await asyncio.wait_for(super()._call_s3(method, *akwarglist, **kwargs), deadline)
        except TRANSPORT_ERRORS as exc:
            elapsed = time.monotonic() - t0
            cause = f"no answer within the {deadline:.0f} s request deadline" if elapsed >= deadline else None
            raise self._give_up(method, kwargs, exc, elapsed, cause) from exc

    call_s3 = sync_wrapper(_call_s3)  # s3fs binds its own _call_s3 here; S3File (open "wb") calls this

    async def set_session(self, *args, **kwargs):
        s3 = await super().set_session(*args, **kwargs)
        s3.meta.events.register("before-send.s3", _no_expect_continue,
                                unique_id="echotune-no-expect-continue")
        return s3

    async def _cat_file(self, path, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return await super()._cat_file(path, *args, **kwargs)
        except TRANSPORT_ERRORS as exc:  # the body stalled after the request itself was answered
            raise self._give_up("get_object", {"path": path}, exc, time.monotonic() - t0) from exc

    async def _get_file(self, rpath, lpath, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return await super()._get_file(rpath, lpath, *args, **kwargs)
        except TRANSPORT_ERRORS as exc:
            raise self._give_up("get_object", {"path": rpath}, exc, time.monotonic() - t0) from exc

    def _give_up(self, method: str, kwargs: dict, exc: BaseException, elapsed: float,
                 cause: str | None = None) -> StorageError:
        """The StorageError for a request that failed in transport; remembered for GIVE_UP_MEMORY_S."""
        where = kwargs.get("path") or f"{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}".rstrip("/")
        chain = _chain(exc)
        timed_out = any(isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ for e in chain)
        if cause is None:
            cause = f"{type(exc).__name__}: {exc}"
            if chain[-1] is not exc:  # e.g. "Could not connect" whose root is a send that timed out
                cause += f"; cause: {type(chain[-1]).__name__}: {chain[-1]}"
        error = StorageError(scrub(
            f"S3 endpoint {self._endpoint_name()} {'did not answer in time' if timed_out else 'failed'}: "
            f"{_op_name(method)} s3://{where} gave up after {elapsed:.0f} s ({cause}). Check that the "
            f"endpoint is up and reachable from this machine (--s3-endpoint / AWS_ENDPOINT_URL), "
            f"then re-run."))
        self._gave_up = (time.monotonic(), error)
        return error

    def _endpoint_name(self) -> str:
        try:
            return safe_url(self._s3.meta.endpoint_url)
        except AttributeError:
            return safe_url(self.client_kwargs.get("endpoint_url") or self.endpoint_url or "(AWS default)")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    out = [exc]
    while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out and len(out) < 10:
        out.append(nxt)
    return out


def _no_expect_continue(request, **_kwargs) -> None:
    """Send request bodies at once, without "Expect: 100-continue" (botocore adds it to uploads).

    aiohttp waits for the server's "100 Continue" with no timeout at all (its read timeout starts
    only once the body is sent), so a stalled endpoint held an upload forever. Expect is not a
    signed header, so dropping it keeps the signature valid; the price is that a rejected upload
    (wrong credentials) sends its body in vain. Returns None: a value would replace the response.
    """
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _op_name(method: str) -> str:
    """``put_object`` -> ``PutObject``, the name S3 documentation and server logs use."""
    return "".join(part.capitalize() for part in method.split("_"))


def safe_url(url: str | None) -> str:
    """``url`` without user:password@ and without a query string (presigned URLs carry signatures)."""
    if not url:
        return str(url)
    return re.sub(r"^([a-z0-9+.-]+://)[^/@]*@", r"\1", str(url), flags=re.I).split("?", 1)[0]


def scrub(text: str) -> str:
    """``text`` with any credential this process holds replaced by ***."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return re.sub(r"(X-Amz-(Signature|Credential|Security-Token)=)[^&\s\"']+", r"\1***", text, flags=re.I)


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------

def describe(uri: str, endpoint: str | None = None) -> str:
    """A human name for where ``uri`` lives (endpoint included for S3; never credentials)."""
    ep = s3_endpoint(endpoint) if _is_s3(uri) else None
    return f"{uri} (endpoint {safe_url(ep)})" if ep else str(uri)


def storage_error(uri: str, endpoint: str | None, exc: BaseException, action: str) -> StorageError:
    """A StorageError for a failed ``action`` on ``uri`` that says where and what to do."""
    if isinstance(exc, StorageError):  # already names the endpoint, the object and what to do
        return StorageError(scrub(f"cannot {action} {uri}: {exc}"))
    return StorageError(scrub(f"cannot {action} {describe(uri, endpoint)}: {type(exc).__name__}: {exc}. "
                              f"Check the URI, --s3-endpoint / AWS_ENDPOINT_URL and your credentials."))


# ---------------------------------------------------------------------------------------------
# pyarrow (Ray experiment storage)
# ---------------------------------------------------------------------------------------------

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
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=PA_ATTEMPTS),
                           request_timeout=PA_REQUEST_TIMEOUT_S, connect_timeout=CONNECT_TIMEOUT_S)
    return fs, str(uri)[len("s3://"):].rstrip("/")
