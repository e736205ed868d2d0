"""Registry.record: figures measured after publishing go into a version's manifest; files stay verified."""

import json

import pytest

from rayllm.registry import Registry, RegistryError


def _adapter(folder, rank=4):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_record_adds_figures_beside_the_facts_and_keeps_checksums(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    ref = reg.publish("bot", str(_adapter(tmp_path / "a")))
    reg.record(ref, "eval", "first", {"ppl": 3.5})
    manifest = reg.record(ref, "eval", "second", {"ppl": 3.4})
    assert manifest["eval"] == {"first": {"ppl": 3.5}, "second": {"ppl": 3.4}}
    assert reg.show(ref, verify=True)["manifest"]["eval"]["second"] == {"ppl": 3.4}
    with pytest.raises(RegistryError, match="written at publish time"):
        reg.record(ref, "metrics", "x", 1)
    with pytest.raises(RegistryError, match="needs one version"):
        reg.record("bot", "eval", "x", 1)
    with pytest.raises(RegistryError, match="does not exist"):
        reg.record("bot@v9", "eval", "x", 1)
