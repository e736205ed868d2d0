"""rayllm.storage: URIs, and s3fs-style options and the AWS environment on pyarrow's S3 client (no network)."""

from __future__ import annotations

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from rayllm.storage import is_uri, s3, url_to_fs
from rayllm.storage.s3 import ArrowS3FileSystem, S3Options

S3FS_STYLE = {"key": "AK", "secret": "SK", "token": "TOK", "skip_instance_cache": True,
              "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}}


def test_s3fs_options_map_to_pyarrow_and_boto3() -> None:
    opts = S3Options.from_storage_options(S3FS_STYLE, environ={})
    assert opts.arrow_kwargs() == {"access_key": "AK", "secret_key": "SK", "session_token": "TOK", "anonymous": False,
                                   "region": "eu-west-1", "scheme": "http", "endpoint_override": "127.0.0.1:9000"}
    assert opts.boto3_kwargs() == {"aws_access_key_id": "AK", "aws_secret_access_key": "SK", "aws_session_token": "TOK",
                                   "region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9000"}
    assert "SK" not in repr(opts) and "AK" not in repr(opts)


def test_environment_fills_what_options_leave_out() -> None:
    env = {"AWS_ENDPOINT_URL": "https://minio.example:9443/", "AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "us-west-2"}
    kw = S3Options.from_storage_options({}, environ=env).arrow_kwargs()
    assert kw == {"anonymous": False, "region": "ap-south-1", "scheme": "https", "endpoint_override": "minio.example:9443"}
    assert "access_key" not in kw  # credentials left to the SDK's chain: AWS_ACCESS_KEY_ID, ~/.aws, instance role
    assert S3Options.from_storage_options({}, environ={"AWS_DEFAULT_REGION": "us-west-2", "AWS_ENDPOINT_URL": "x:1"}).region == "us-west-2"
    explicit = S3Options.from_storage_options({"endpoint_url": "http://other:1", "client_kwargs": {"region_name": "r"}}, environ=env)
    assert (explicit.endpoint_url, explicit.region) == ("http://other:1", "r")


def test_endpoint_without_scheme_follows_use_ssl() -> None:
    assert S3Options.from_storage_options({"endpoint_url": "localhost:9000", "use_ssl": False},
                                          environ={"AWS_REGION": "r"}).arrow_kwargs()["scheme"] == "http"
    assert S3Options.from_storage_options({"endpoint_url": "localhost:9000"},
                                          environ={"AWS_REGION": "r"}).arrow_kwargs()["scheme"] == "https"


def test_region_of_the_bucket_is_looked_up_only_on_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    monkeypatch.setattr(s3, "_bucket_region", lambda bucket: asked.append(bucket) or "eu-central-1")
    assert S3Options.from_storage_options({}, environ={}, bucket="b1").region == "eu-central-1"
    assert S3Options.from_storage_options({"endpoint_url": "http://h:1"}, environ={}, bucket="b2").region is None
    assert asked == ["b1"]


def test_unknown_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"requester_pays, client_kwargs\.verify"):
        S3Options.from_storage_options({"requester_pays": True, "client_kwargs": {"verify": False}}, environ={})


def test_s3_urls_use_pyarrow_without_s3fs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "_s3fs_importable", lambda: False)
    fs, path = url_to_fs("s3://bucket/prefix/", **S3FS_STYLE)
    assert isinstance(fs, ArrowS3FileSystem) and path == "bucket/prefix"
    assert fs.unstrip_protocol(f"{path}/name/v1") == "s3://bucket/prefix/name/v1"
    other, _ = url_to_fs("s3://bucket/prefix", **{**S3FS_STYLE, "key": "AK2"})
    assert other is not fs and other.options.access_key == "AK2"  # never a cached instance with other credentials
    mem, mpath = url_to_fs("memory://x/y")
    assert isinstance(mem, MemoryFileSystem) and mpath == "/x/y"


def test_exclusive_create_sends_one_put_on_close_and_none_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "_s3fs_importable", lambda: False)
    fs, root = url_to_fs("s3://bucket/r", **S3FS_STYLE)
    sent = []
    monkeypatch.setattr(fs, "put_if_absent", lambda path, data: sent.append((path, data)))
    with fs.open(f"{root}/n/v1.claim", "xb") as f:
        f.write(b"a")
        f.write(b"b")
    assert sent == [("bucket/r/n/v1.claim", b"ab")]
    with pytest.raises(RuntimeError):
        with fs.open(f"{root}/n/v2.claim", "xb") as f:
            f.write(b"half")
            raise RuntimeError("failed before the claim was complete")
    assert len(sent) == 1


def test_is_uri_tells_urls_from_local_paths() -> None:
    assert is_uri("s3://bucket/x") and is_uri("memory://x") and is_uri("file:///tmp/x")
    assert not is_uri("/tmp/x") and not is_uri("runs/registry") and not is_uri("~/x") and not is_uri("c:\\x")
