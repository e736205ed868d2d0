"""Alias files replaced only if nobody changed them since they were read: the registry's compare-and-swap.

An alias write is a read-modify-write (the new file carries the old targets into its history), so
two writers that both read before either writes would lose one update. Each backend gets the
cheapest guard it has:
  * local disk: an exclusive `fcntl.flock` on `<root>/.lock`, held around the whole read-modify-write
    (and around deleting a version, so a promote and a delete never interleave);
  * S3: the write is a conditional PUT, `If-Match: <ETag read>` (`If-None-Match: *` when the alias
    did not exist), and a delete is a conditional DELETE; a 412 means another writer won, so the
    caller reads again and retries. pyarrow's S3 client cannot send these headers, so these
    requests go through boto3 (as the version claim does, rayllm/storage/s3.py);
  * any other fsspec store: no conditional write is known, so the write is plain: concurrent
    writers from several processes there can lose an update (said in README).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

from fsspec import AbstractFileSystem

from rayllm.registry.fingerprint import json_blob, parse_json_object, read_json, write_json_atomic
from rayllm.registry.names import RegistryError

LOCK_FILE = ".lock"  # not a valid adapter name (it starts with '.'), so listings skip it


class WriteConflict(RegistryError):
    """The object changed between our read and our write: another writer won; read again and retry."""


class AliasFiles:
    """Read an alias file with a token (its ETag on S3) and write or remove it only if it still has that token."""

    def __init__(self, fs: AbstractFileSystem, root: str, local: bool) -> None:
        self.fs, self.root, self.local = fs, root, local

    @functools.cached_property
    def _s3(self) -> Any:
        """boto3's client on S3 (made on first write: serving only reads), else None."""
        return None if self.local else _s3_client(self.fs)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes on local disk (a no-op elsewhere: there the writes are conditional)."""
        if not self.local:
            yield
            return
        import fcntl

        fd = os.open(os.path.join(self.root, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # each open() is its own lock owner: threads exclude each other too
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self, path: str, where: str) -> tuple[dict[str, Any] | None, str | None]:
        """(content or None when absent, token for `write`/`remove`). On S3 a single GET, which returns one
        whole version of the object; pyarrow's reader takes the size first and the bytes after, and
        across a concurrent replace it returned a torn file."""
        if self._s3 is None:
            return read_json(self.fs, path, where), None
        bucket, key = _bucket_key(self.fs, path)
        try:
            got = self._s3.get_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - botocore's error classes are built at run time
            if _status(e) == 404:
                return None, None
            raise
        return parse_json_object(got["Body"].read(), where), got["ETag"]

    def write(self, path: str, data: dict[str, Any], token: str | None, existed: bool) -> str | None:
        """Replace `path` if it still has `token` (create it if it did not exist); WriteConflict otherwise.
        Returns the new token."""
        if self._s3 is None:
            write_json_atomic(self.fs, path, data, self.local)
            return None
        bucket, key = _bucket_key(self.fs, path)
        condition = {"IfMatch": token} if existed else {"IfNoneMatch": "*"}
        try:
            return self._s3.put_object(Bucket=bucket, Key=key, Body=json_blob(data), ContentType="application/json", **condition)["ETag"]
        except Exception as e:  # noqa: BLE001
            if _status(e) in (404, 409, 412):  # changed, removed, or another conditional write in flight
                raise WriteConflict(f"{self.fs.unstrip_protocol(path)} changed while it was written") from None
            raise

    def remove(self, path: str, token: str | None) -> None:
        """Delete `path` if it still has `token`; WriteConflict otherwise."""
        if self._s3 is None:
            self.fs.rm(path)
            return
        bucket, key = _bucket_key(self.fs, path)
        try:
            self._s3.delete_object(Bucket=bucket, Key=key, IfMatch=token)
        except Exception as e:  # noqa: BLE001
            if _status(e) in (404, 409, 412):
                raise WriteConflict(f"{self.fs.unstrip_protocol(path)} changed while it was deleted") from None
            raise


def _status(error: Exception) -> int | None:
    """The HTTP status of a botocore ClientError (None for anything else)."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    named = {"NoSuchKey": 404, "PreconditionFailed": 412, "ConditionalRequestConflict": 409}.get(code)
    return named or response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _bucket_key(fs: AbstractFileSystem, path: str) -> tuple[str, str]:
    bucket, _, key = path.split("://", 1)[-1].partition("/")  # registry paths are `bucket/key` already
    return bucket, key


def _s3_client(fs: AbstractFileSystem) -> Any:
    """A boto3 S3 client with the filesystem's own credentials and endpoint, or None when `fs` is not S3."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if not set(protocols) & {"s3", "s3a"}:
        return None
    if hasattr(fs, "_s3_client"):  # rayllm.storage.s3.ArrowS3FileSystem: the client its version claims use
        return fs._s3_client()
    # s3fs: a boto3 client from the same s3fs-style options (its own client is asynchronous)
    import boto3

    from rayllm.storage.s3 import S3Options

    options = {k: v for k, v in getattr(fs, "storage_options", {}).items()
               if k in ("key", "secret", "token", "anon", "endpoint_url", "use_ssl", "client_kwargs")}
    if "client_kwargs" in options:
        options["client_kwargs"] = {k: v for k, v in options["client_kwargs"].items()
                                    if k in ("endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key",
                                             "aws_session_token")}
    return boto3.session.Session().client("s3", **S3Options.from_storage_options(options).boto3_kwargs())
