"""s3:// without s3fs: pyarrow's S3 client behind fsspec, plus the two operations it lacks.

s3fs cannot always be installed (it pins aiobotocore, which pins botocore, which may clash with
the boto3 a cluster already has), while pyarrow ships its own S3 client. So an `s3://` URL uses
s3fs when it imports and otherwise `pyarrow.fs.S3FileSystem` behind fsspec's `ArrowFSWrapper`
(`rayllm.storage.url_to_fs` decides); callers keep making the same fsspec calls either way. The
storage options users already write for s3fs (`key`, `secret`, `client_kwargs.endpoint_url`, ...)
mean the same on both.

The wrapper lacks two operations the registry's guarantees rest on, filled in here:
- an exclusive create, `open(path, "xb")`, which claims a version number: S3 has no atomic
  rename, so it is one conditional PUT (`If-None-Match: *`) that fails when the key exists.
  pyarrow cannot send that header, so this one request goes through boto3;
- a server-side copy (`copy`), instead of the wrapper's download, re-upload and move.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fsspec import AbstractFileSystem
from fsspec.implementations.arrow import ArrowFSWrapper

from rayllm.storage import is_uri

S3_SCHEMES = ("s3", "s3a")
# s3fs options about its own listing/instance caches: nothing to map, harmless to drop.
_CACHE_OPTIONS = frozenset({"skip_instance_cache", "use_listings_cache", "listings_expiry_time"})
_TOP_OPTIONS = frozenset({"key", "secret", "token", "anon", "endpoint_url", "use_ssl", "client_kwargs"}) | _CACHE_OPTIONS
_CLIENT_OPTIONS = frozenset({"endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key",
                             "aws_session_token"})


def needs_arrow(url: str) -> bool:
    """True for an `s3://` URL (no fsspec chaining) on a machine without s3fs."""
    scheme = url.split("://", 1)[0].lower() if is_uri(url) else ""
    return scheme in S3_SCHEMES and "::" not in url and not _s3fs_importable()


def arrow_url_to_fs(url: str, **storage_options: Any) -> tuple[AbstractFileSystem, str]:
    """The pyarrow-backed filesystem for an `s3://` URL and the URL's path on it (`bucket/key`)."""
    fs = ArrowS3FileSystem(S3Options.from_storage_options(storage_options, bucket=urlsplit(url).netloc))
    return fs, fs._strip_protocol(url).rstrip("/")


@functools.cache
def _s3fs_importable() -> bool:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class S3Options:
    """Where and as whom to reach S3; None leaves a value to the AWS SDK's own lookup (env, ~/.aws)."""

    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    anonymous: bool = False
    region: str | None = None
    endpoint_url: str | None = None  # with its scheme: http://127.0.0.1:9000

    def __repr__(self) -> str:  # never print a secret into a log
        return f"S3Options(region={self.region!r}, endpoint_url={self.endpoint_url!r}, anonymous={self.anonymous})"

    @classmethod
    def from_storage_options(cls, options: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                             bucket: str | None = None) -> "S3Options":
        """Read s3fs-style storage options, falling back to the standard AWS environment variables.

        An option s3fs knows but this mapping does not is refused by name rather than ignored,
        so a setting never silently stops applying when s3fs is absent.
        """
        env = os.environ if environ is None else environ
        client = dict(options.get("client_kwargs") or {})
        unknown = sorted(set(options) - _TOP_OPTIONS) + sorted(f"client_kwargs.{k}" for k in set(client) - _CLIENT_OPTIONS)
        if unknown:
            raise ValueError(f"storage option(s) {', '.join(unknown)} not supported for s3:// without s3fs; supported: "
                             f"{', '.join(sorted(_TOP_OPTIONS - _CACHE_OPTIONS))}, client_kwargs."
                             f"{{{', '.join(sorted(_CLIENT_OPTIONS))}}} (or install s3fs)")
        endpoint = (options.get("endpoint_url") or client.get("endpoint_url")
                    or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None)
        if endpoint and not is_uri(endpoint):
            endpoint = f"{'https' if options.get('use_ssl', True) else 'http'}://{endpoint}"
        region = client.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        if region is None and endpoint is None and bucket:
            region = _bucket_region(bucket)  # AWS answers a wrong region with a redirect pyarrow does not follow
        return cls(access_key=options.get("key") or client.get("aws_access_key_id"),
                   secret_key=options.get("secret") or client.get("aws_secret_access_key"),
                   session_token=options.get("token") or client.get("aws_session_token"),
                   anonymous=bool(options.get("anon", False)), region=region, endpoint_url=endpoint)

    def arrow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `pyarrow.fs.S3FileSystem`."""
        kw: dict[str, Any] = {"access_key": self.access_key, "secret_key": self.secret_key,
                              "session_token": self.session_token, "anonymous": self.anonymous, "region": self.region}
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            kw["scheme"] = parts.scheme
            kw["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        return {k: v for k, v in kw.items() if v is not None}

    def boto3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `boto3.session.Session().client("s3", ...)`."""
        kw = {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key,
              "aws_session_token": self.session_token, "region_name": self.region, "endpoint_url": self.endpoint_url}
        return {k: v for k, v in kw.items() if v is not None}


def _bucket_region(bucket: str) -> str | None:
    from pyarrow.fs import resolve_s3_region

    try:
        return resolve_s3_region(bucket)
    except (OSError, ValueError):
        return None  # no network or no such bucket: let the SDK's default show the real error later


class ArrowS3FileSystem(ArrowFSWrapper):
    """fsspec over `pyarrow.fs.S3FileSystem`, plus an exclusive create and a server-side copy.

    Paths are `bucket/key` without the scheme; `unstrip_protocol` turns them back into `s3://` URLs.
    """

    cachable = False  # fsspec's instance cache keys on repr(options), which hides the credentials

    def __init__(self, options: S3Options, **kwargs: Any) -> None:
        from pyarrow.fs import S3FileSystem

        super().__init__(S3FileSystem(**options.arrow_kwargs()), **kwargs)
        self.options = options
        self._client: Any = None
        self._client_lock = threading.Lock()

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, seekable: bool = True,
              **kwargs: Any) -> Any:
        if mode == "xb":
            return _ExclusiveFile(self, self._strip_protocol(path))
        return super()._open(path, mode, block_size, seekable, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        # CopyObject: the bytes stay in the store and the new key appears whole, as with s3fs.
        self.fs.copy_file(self._strip_protocol(path1).rstrip("/"), self._strip_protocol(path2).rstrip("/"))

    def put_if_absent(self, path: str, data: bytes) -> None:
        """Create `path` with `data` in one PUT, or raise FileExistsError if it exists (even if created meanwhile)."""
        from botocore.exceptions import ClientError

        bucket, _, key = self._strip_protocol(path).partition("/")
        for attempt in range(6):
            try:
                self._s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code == "PreconditionFailed" or status == 412:
                    raise FileExistsError(errno.EEXIST, "object exists", f"s3://{bucket}/{key}") from e
                if not (code == "ConditionalRequestConflict" or status == 409) or attempt == 5:
                    raise
                time.sleep(0.05 * 2**attempt)  # a concurrent conditional PUT to this key is in flight; AWS says retry

    def _s3_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                try:
                    import boto3
                except ImportError as e:
                    raise ImportError("an exclusive create on s3:// (how the registry claims a version number) is a "
                                      "conditional PUT that pyarrow cannot send: install boto3 (or s3fs)") from e
                kw = self.options.boto3_kwargs()
                if self.options.anonymous:
                    from botocore import UNSIGNED
                    from botocore.config import Config

                    kw["config"] = Config(signature_version=UNSIGNED)
                # A session per client: boto3's default session is not safe to share across threads.
                self._client = boto3.session.Session().client("s3", **kw)
            return self._client


class _ExclusiveFile(io.BytesIO):
    """Bytes kept in memory and sent as one conditional PUT on close; nothing is sent if the `with` body raised."""

    def __init__(self, fs: ArrowS3FileSystem, path: str) -> None:
        super().__init__()
        self.fs, self.path, self._aborted = fs, path, False

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._aborted = exc_type is not None
        super().__exit__(exc_type, *rest)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._aborted:
                self.fs.put_if_absent(self.path, self.getvalue())
        finally:
            super().close()
