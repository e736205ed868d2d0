"""Paths and URLs every layer shares: is it a URI, and the fsspec filesystem behind one.

Training (run dirs on `s3://`), the registry and serving (adapter folders on `s3://`) all reach
object stores through `url_to_fs`, so one URL means the same filesystem, with the same
credentials, everywhere. Light to import: fsspec and pyarrow load on the first `url_to_fs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


def is_uri(path: str) -> bool:
    """True for `scheme://...` (an object store or any fsspec URL), False for a local path."""
    return "://" in str(path)


def url_to_fs(url: str, **storage_options: Any) -> "tuple[AbstractFileSystem, str]":
    """`fsspec.core.url_to_fs`, except that `s3://` also works without s3fs (through pyarrow)."""
    import fsspec

    from rayllm.storage import s3

    url = str(url)
    if s3.needs_arrow(url):
        return s3.arrow_url_to_fs(url, **storage_options)
    return fsspec.core.url_to_fs(url, **storage_options)
