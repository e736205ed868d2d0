"""Adapter registry: names, publish/manifest, checksums, aliases, delete, rollback, splits, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
from pathlib import Path

import pytest

from rayllm.registry import AdapterRef, InvalidNameError, Registry, RegistryError, promote_if_better, validate_name
from rayllm.registry import cli


def make_adapter(folder: Path, seed: int = 0, rank: int = 8, metrics: dict | None = None, meta: bool = True) -> Path:
    """A fake PEFT folder: config, random weights, and rayllm's metadata file (unless meta=False)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": rank, "target_modules": ["v_proj", "q_proj"], "base_model_name_or_path": "tiny-base", "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(4096 + seed))
    if meta:
        (folder / "rayllm_adapter.json").write_text(json.dumps(
            {"base_fingerprint": "fp-123", "rank": rank, "target_modules": ["q_proj", "v_proj"], "config_hash": "cfg-9",
             "metrics": metrics if metrics is not None else {"val_loss": 2.0}, "source_run": f"runs/r{seed}"}))
    return folder


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "registry"))


# -- names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, part", [
    ("../x", "separator"), ("a/b", "separator"), ("a\\b", "separator"), (".hidden", "starts with '.'"),
    ("", "empty"), ("x@y", "'@'"), ("x:y", "':'"), ("a" * 65, "65 characters"), ("..", "traversal"),
    ("Support", "lowercase"), ("a b", "allowed"), ("-x", "starts with '-'"), ("prod\n", "allowed"),
])
def test_bad_names_rejected_with_the_reason(bad: str, part: str) -> None:
    with pytest.raises(InvalidNameError, match=None) as err:
        validate_name(bad)
    assert part in str(err.value)
    assert isinstance(err.value, ValueError)


def test_publish_refuses_traversal_names_and_writes_nothing_outside_root(tmp_path: Path, reg: Registry) -> None:
    src = make_adapter(tmp_path / "ad")
    for bad in ["../escaped", "a/b", "a\\b", ".hidden", "", "x@y", "a" * 100]:
        with pytest.raises(InvalidNameError):
            reg.publish(bad, str(src))
    assert not (tmp_path / "escaped").exists()
    assert sorted(os.listdir(tmp_path / "registry")) == []


def test_refs_parse_and_reject() -> None:
    assert (AdapterRef.parse("support").name, AdapterRef.parse("support").version, AdapterRef.parse("support").alias) == ("support", None, None)
    assert AdapterRef.parse("support@v12").version == 12
    assert AdapterRef.parse("support:prod").alias == "prod"
    assert str(AdapterRef.parse("support:prod")) == "support:prod"
    for bad, part in [("s@3", "vN"), ("s@v0", "vN"), ("s@v01", "vN"), ("s:v3", "looks like a version"),
                      ("s@v1:prod", "both"), ("s::x", "more than one"), ("s:", "empty"), ("../s@v1", "separator")]:
        with pytest.raises(InvalidNameError) as err:
            AdapterRef.parse(bad)
        assert part in str(err.value), (bad, str(err.value))


# -- publish and manifest -------------------------------------------------------------------------
def test_publish_numbers_versions_and_records_a_manifest(tmp_path: Path, reg: Registry) -> None:
    src = make_adapter(tmp_path / "ad", seed=1, metrics={"val_loss": 1.5})
    assert reg.publish("support", str(src)) == "support@v1"
    assert reg.publish("support", str(src), metrics={"val_acc": 0.7}, source_run="runs/x") == "support@v2"
    m1, m2 = reg.resolve("support@v1").manifest, reg.resolve("support@v2").manifest
    assert (m1["base_fingerprint"], m1["rank"], m1["target_modules"], m1["config_hash"]) == ("fp-123", 8, ["q_proj", "v_proj"], "cfg-9")
    assert m1["metrics"] == {"val_loss": 1.5} and m1["source_run"] == "runs/r1"
    assert m2["metrics"] == {"val_loss": 1.5, "val_acc": 0.7} and m2["source_run"] == "runs/x"
    for rel in ["adapter_config.json", "adapter_model.safetensors", "rayllm_adapter.json"]:
        data = (src / rel).read_bytes()
        assert m1["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert (Path(reg.resolve("support@v1").path) / rel).read_bytes() == data
    assert reg.versions("support") == [1, 2]
    assert not list((tmp_path / "registry" / "support" / "_staging").iterdir())  # staging cleaned up


def test_manifest_falls_back_to_peft_config(tmp_path: Path, reg: Registry) -> None:
    src = make_adapter(tmp_path / "ad", rank=4, meta=False)
    m = reg.resolve(reg.publish("plain", str(src))).manifest
    assert (m["rank"], m["target_modules"], m["base_model"], m["base_fingerprint"]) == (4, ["q_proj", "v_proj"], "tiny-base", None)


def test_publish_refuses_non_adapters(tmp_path: Path, reg: Registry) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="adapter_config.json"):
        reg.publish("x", str(tmp_path / "empty"))
    with pytest.raises(RegistryError, match="does not exist"):
        reg.publish("x", str(tmp_path / "missing"))
    assert reg.versions("x") == []


def test_unfinished_versions_are_invisible_and_never_reused(tmp_path: Path, reg: Registry) -> None:
    src = make_adapter(tmp_path / "ad")
    reg.publish("s", str(src))
    # a publish that died after claiming v2 and moving files, before its manifest landed
    (tmp_path / "registry" / "s" / "v2.claim").write_text("{}")
    (tmp_path / "registry" / "s" / "v2").mkdir()
    (tmp_path / "registry" / "s" / "v2" / "adapter_model.safetensors").write_bytes(b"half")
    assert reg.resolve("s").version == 1 and reg.versions("s") == [1]
    assert [found.version for found, _ in reg.list("s")] == [1]
    with pytest.raises(RegistryError, match="s@v2 does not exist"):
        reg.resolve("s@v2")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.promote("s:prod", 2)
    assert reg.publish("s", str(src)) == "s@v3"


# -- checksums ------------------------------------------------------------------------------------
def test_tampered_file_is_detected_by_resolve_fetch_and_show(tmp_path: Path, reg: Registry) -> None:
    ref = reg.publish("s", str(make_adapter(tmp_path / "ad")))
    weights = Path(reg.resolve(ref).path) / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" + weights.read_bytes()[1:])
    for call in (lambda: reg.resolve(ref), lambda: reg.resolve("s"), lambda: reg.show(ref, verify=True),
                 lambda: reg.fetch(ref, str(tmp_path / "local"))):
        with pytest.raises(RegistryError, match="checksum mismatch in file 'adapter_model.safetensors'"):
            call()
    assert not (tmp_path / "local").exists()  # no half-fetched folder left behind
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert reg.resolve(ref, verify=False).version == 1  # unverified reads still work, for per-request routing


def test_missing_and_extra_files_are_detected(tmp_path: Path, reg: Registry) -> None:
    ref = reg.publish("s", str(make_adapter(tmp_path / "ad")))
    vdir = Path(reg.resolve(ref).path)
    (vdir / "adapter_model.bin").write_bytes(b"sneaky")
    with pytest.raises(RegistryError, match="'adapter_model.bin' is not in manifest"):
        reg.resolve(ref)
    (vdir / "adapter_model.bin").unlink()
    (vdir / "adapter_config.json").unlink()
    with pytest.raises(RegistryError, match="'adapter_config.json' listed in manifest.json is missing"):
        reg.resolve(ref)


def test_fetch_copies_verifies_and_reuses(tmp_path: Path, reg: Registry) -> None:
    src = make_adapter(tmp_path / "ad", seed=3)
    reg.publish("s", str(src))
    reg.promote("s:prod", 1)
    local = reg.fetch("s:prod", str(tmp_path / "cache" / "s"))
    assert local.path == str(tmp_path / "cache" / "s") and local.version == 1
    for rel in ["adapter_config.json", "adapter_model.safetensors", "rayllm_adapter.json"]:
        assert (Path(local.path) / rel).read_bytes() == (src / rel).read_bytes()
    assert json.loads((Path(local.path) / "manifest.json").read_text()) == local.manifest
    (Path(local.path) / "adapter_model.safetensors").write_bytes(b"corrupted locally")
    reg.fetch("s@v1", local.path)  # a local copy that no longer matches is replaced
    assert (Path(local.path) / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    in_place = reg.localize("s:prod", str(tmp_path / "unused-cache"))  # a local root needs no copy
    assert in_place.path == reg.resolve("s@v1").path and not (tmp_path / "unused-cache").exists()


# -- aliases ------------------------------------------------------------------------------------
def test_delete_refused_while_aliased_then_allowed(tmp_path: Path, reg: Registry) -> None:
    src = make_adapter(tmp_path / "ad")
    reg.publish("s", str(src)), reg.publish("s", str(src))
    reg.promote("s:prod", {1: 90, 2: 10})
    with pytest.raises(RegistryError, match="alias s:prod"):
        reg.delete("s@v1")
    reg.promote("s:prod", 2)
    reg.delete("s@v1")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.resolve("s@v1")
    assert reg.versions("s") == [2]
    assert reg.publish("s", str(src)) == "s@v3"  # numbers are never reused
    with pytest.raises(RegistryError, match="s@vN or s:alias"):
        reg.delete("s")
    reg.delete("s:prod")
    assert reg.get_alias("s:prod") is None


def test_rollback_restores_previous_targets(tmp_path: Path, reg: Registry) -> None:
    src = make_adapter(tmp_path / "ad")
    for _ in range(3):
        reg.publish("s", str(src))
    reg.promote("s:prod", 1)
    reg.promote("s:prod", "v2")
    reg.promote("s:prod", ["v2=90", "v3=10"])
    assert reg.get_alias("s:prod").shares() == pytest.approx({2: 0.9, 3: 0.1})
    assert reg.rollback("s:prod").shares() == {2: 1.0}
    assert reg.resolve("s:prod").version == 2
    assert reg.rollback("s:prod").shares() == {1: 1.0}
    with pytest.raises(RegistryError, match="no earlier target"):
        reg.rollback("s:prod")
    with pytest.raises(RegistryError, match="alias s:canary does not exist"):
        reg.rollback("s:canary")


def test_promote_validates_targets(tmp_path: Path, reg: Registry) -> None:
    reg.publish("s", str(make_adapter(tmp_path / "ad")))
    for targets, part in [({1: -1}, "positive"), ([(1, 1.0), (1, 2.0)], "twice"), ([], "at least one"),
                          ({1: float("nan")}, "positive"), ("v7", "s@v7 does not exist"), ("x1", "vN")]:
        with pytest.raises(RegistryError, match=part):
            reg.promote("s:prod", targets)
    with pytest.raises(RegistryError, match="not an alias ref"):
        reg.promote("s@v1", 1)
    assert reg.get_alias("s:prod") is None


@pytest.mark.parametrize("weights", [{1: 50, 2: 50}, {1: 90, 2: 10}])
def test_weighted_split_matches_weights(tmp_path: Path, reg: Registry, weights: dict[int, int]) -> None:
    src = make_adapter(tmp_path / "ad")
    reg.publish("s", str(src)), reg.publish("s", str(src))
    reg.promote("s:prod", weights)
    n, p = 1000, weights[1] / 100
    rng = random.Random(11)
    draws = [reg.resolve("s:prod", rng=rng, verify=False).version for _ in range(n)]
    hits = draws.count(1)
    assert abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), (hits, weights)
    assert set(draws) == {1, 2}
    first, second = random.Random(5), random.Random(5)  # seeded: a split replays exactly
    assert [reg.resolve("s:prod", rng=first, verify=False).version for _ in range(50)] == \
        [reg.resolve("s:prod", rng=second, verify=False).version for _ in range(50)]


# -- promote_if_better --------------------------------------------------------------------------
def test_promote_if_better(tmp_path: Path, reg: Registry) -> None:
    for i, loss in enumerate([2.0, 1.95, 1.5, 1.6]):
        reg.publish("s", str(make_adapter(tmp_path / f"ad{i}", seed=i, metrics={"val_loss": loss})))
    assert promote_if_better(reg, "s", "prod", 1, margin=0.1)  # no alias yet: promoted
    assert not promote_if_better(reg, "s", "prod", 2, margin=0.1)  # 0.05 better: below margin
    assert reg.resolve("s:prod").version == 1
    assert promote_if_better(reg, "s", "prod", 3, margin=0.1)  # 0.5 better
    assert reg.resolve("s:prod").version == 3
    assert not promote_if_better(reg, "s", "prod", 4)  # worse
    assert not promote_if_better(reg, "s", "prod", 3)  # already there
    reg.publish("s", str(make_adapter(tmp_path / "tie", metrics={"val_loss": 1.5})))
    assert not promote_if_better(reg, "s", "prod", 5)  # a tie is not an improvement
    reg.promote("s:prod", {3: 90, 4: 10})
    assert not promote_if_better(reg, "s", "prod", 2, margin=0.0)  # a person's canary is left alone
    reg.publish("s", str(make_adapter(tmp_path / "nometric", metrics={})))
    with pytest.raises(RegistryError, match="no finite metric 'val_loss'"):
        promote_if_better(reg, "s", "prod", 6)
    assert reg.get_alias("s:prod").shares() == pytest.approx({3: 0.9, 4: 0.1})


# -- CLI -----------------------------------------------------------------------------------------
def _cli(root: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rayllm registry")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(["--root", str(root), *argv]), None)


def test_cli_verbs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "registry"
    src = make_adapter(tmp_path / "ad")
    assert _cli(root, "publish", "support", str(src), "--metrics", '{"val_loss": 1.25}') == 0
    assert _cli(root, "publish", "support", str(src)) == 0
    assert capsys.readouterr().out.split() == ["support@v1", "support@v2"]
    assert _cli(root, "promote", "support:prod", "v1=90", "v2=10", "--skip-gate") == 0  # no endpoint here: tests/unit/test_gate.py
    assert "support:prod -> v1 90% / v2 10%" in capsys.readouterr().out
    assert _cli(root, "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "VERSION", "CREATED", "RANK", "METRICS", "ALIASES"]
    assert "val_loss=1.25" in out[1] and "prod (90%)" in out[1] and "prod (10%)" in out[2]
    assert _cli(root, "show", "support@v1", "--verify") == 0
    out = capsys.readouterr().out
    assert "fp-123" in out and "adapter_model.safetensors" in out and "checksums verified" in out
    assert _cli(root, "show", "support:prod") == 0
    assert "90%" in capsys.readouterr().out
    assert _cli(root, "delete", "support@v2") == 1
    assert "alias support:prod" in capsys.readouterr().err
    assert _cli(root, "rollback", "support:prod") == 1  # first promote: nothing to roll back to
    assert _cli(root, "promote", "support:prod", "v1", "--skip-gate") == 0
    assert _cli(root, "rollback", "support:prod") == 0
    assert "support:prod -> v1 90% / v2 10% (was v1)" in capsys.readouterr().out
    assert _cli(root, "publish", "../evil", str(src)) == 1
    assert "separator" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(root, "publish", "support", str(src), "--metrics", "[1]")


def test_cli_uses_config_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rayllm.config.registry import RegistryConfig

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg = RegistryConfig(path=str(tmp_path / "from-config"))
    assert cli.run(parser.parse_args(["publish", "s", str(make_adapter(tmp_path / "ad"))]), cfg) == 0
    assert Registry(cfg.path).versions("s") == [1]


def test_adapter_ref_is_built_printed_and_parsed_one_way() -> None:
    v3, prod = AdapterRef.of_version("support", "v3"), AdapterRef.of_alias("support", "prod")
    assert (str(v3), str(prod), str(AdapterRef("support"))) == ("support@v3", "support:prod", "support")
    assert AdapterRef.parse(str(v3)) == v3 and AdapterRef.parse(prod) is prod and v3.version == 3
    assert AdapterRef.parse_alias("support:prod") == prod
    for build in (lambda: AdapterRef.of_version("../x", 1), lambda: AdapterRef.of_version("s", 0),
                  lambda: AdapterRef.of_alias("s", "v2"), lambda: AdapterRef("s", version=1, alias="prod"),
                  lambda: AdapterRef.parse_alias("support@v3")):
        with pytest.raises(InvalidNameError):
            build()


def test_promote_note_is_kept_with_its_targets_and_moves_into_history(tmp_path):
    reg = Registry(tmp_path / "reg")
    src = tmp_path / "ad"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 4, "target_modules": ["q_proj"]}')
    reg.publish("n", src)
    reg.publish("n", src)
    reg.promote("n:prod", 1, note={"gate": "skipped"})
    assert reg.show("n:prod")["note"] == {"gate": "skipped"}
    reg.promote("n:prod", 2, note={"gate": "passed", "served_ppl": 3.0})
    info = reg.show("n:prod")
    assert info["note"]["gate"] == "passed"
    assert info["history"][-1]["note"] == {"gate": "skipped"} and info["history"][-1]["targets"][0]["version"] == 1
    reg.promote("n:prod", 1)
    assert "note" not in reg.show("n:prod") and reg.show("n:prod")["history"][-1]["note"]["gate"] == "passed"
    assert reg.rollback("n:prod").targets[0].version == 2
