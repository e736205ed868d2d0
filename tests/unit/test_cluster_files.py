"""cluster/ and jobs/ files are loaded and checked offline: schema, and every repo file they name exists."""

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert any("scripts/setup.sh" in c for c in cfg["setup_commands"])  # installed the way README does
    assert cfg["head_node_type"] in cfg["available_node_types"]
    bad = {**cfg, "not_a_key": 1}
    with pytest.raises(Exception, match="not_a_key"):
        validate_config(prepare_config(bad))


def test_runtime_env_keys_are_ray_runtime_env_fields():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields
    assert ".venv" in env["excludes"]


def test_dockerfile_installs_with_setup_script():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "scripts/setup.sh" in text and re.search(r"^FROM rayproject/ray:2\.60\.0", text, re.M)


def _kuberay():
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))}


def test_kuberay_manifests_reference_real_files_and_the_same_ray_version():
    docs = _kuberay()
    assert {d["kind"] for d in docs.values()} >= {"RayCluster", "RayJob", "RayService"}
    for name, doc in docs.items():
        assert doc["apiVersion"] == "ray.io/v1", name
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        assert spec["rayVersion"] == "2.60.0", name
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["image"].startswith("ghcr.io/your-org/rayllm"), name
    job = next(d for d in docs.values() if d["kind"] == "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[0] == "python" and (ROOT / entry[1]).is_file() and (ROOT / entry[2]).is_file(), entry


def test_rayservice_serves_the_repos_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = next(d for d in _kuberay().values() if d["kind"] == "RayService")
    inline = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(inline)
    file = yaml.safe_load((ROOT / "serve_configs" / "llama8b_gpu.yaml").read_text())
    assert inline["applications"] == file["applications"]  # the manifest carries exactly the repo's serve config
    serve = inline["applications"][0]["args"]["serve"]
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert serve["replica_gpus"] <= gpus and serve["autoscaling"]["max_replicas"] <= workers["maxReplicas"] * gpus
    for container in (service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0],
                      workers["template"]["spec"]["containers"][0]):
        assert {"name": "RAYLLM_STORAGE", "value": "/mnt/rayllm"} in container["env"]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_validate(path):
    from rayllm.config import load_config

    cfg = load_config(path)
    assert cfg.train is not None or cfg.data is not None or cfg.serve is not None or cfg.tune is not None or cfg.eval is not None


def test_job_recipes_are_short_and_take_a_config():
    for path in sorted((ROOT / "jobs").glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 60, f"{path.name} is a recipe: keep it under 60 lines"
        assert 'add_argument("config")' in text, path.name
