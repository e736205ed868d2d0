"""Both ways the prepared shards reach the workers — streamed by Ray Data (the default) or read from
the parquet files by each worker — give the same rows in the same order: identical runs. The
workers hold every CPU of the local Ray (2 × 1), so Ray Data has none to reserve: its reads must still run."""

import pytest

from tests.ray.train_fixtures import read_metrics, tiny_config, tiny_dataset, train  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_ray_data_ingest_and_file_reads_train_identically(ray_local, tiny_dataset, tmp_path):
    runs = {}
    for ingest in ("ray_data", "files"):
        result = train(tiny_config(tiny_dataset, tmp_path, run_name=ingest, ingest=ingest, cpus_per_worker=1, max_steps=6, save_every=6, eval_every=6))
        assert result["status"] == "finished"
        runs[ingest] = {m["step"]: (m["loss"], m["batch_crc"]) for m in read_metrics(tmp_path / ingest) if "batch_crc" in m}
        runs[ingest]["val"] = result["val_loss"]
    assert sorted(k for k in runs["ray_data"] if k != "val") == list(range(1, 7))
    assert runs["ray_data"] == runs["files"]
