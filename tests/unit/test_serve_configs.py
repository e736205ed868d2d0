"""serve_configs/*.yaml are valid Ray Serve config files whose `args` rayllm's schema accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "serve_configs").glob("*.yaml"))
# ServeDeploySchema lets unknown keys inside an application pass, so check those against this list.
APP_KEYS = {"name", "route_prefix", "import_path", "runtime_env", "args", "deployments", "logging_config",
            "external_scaler_enabled", "autoscaling_policy", "request_router_config"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_file_is_valid(path):
    from ray.serve.schema import ServeDeploySchema

    from rayllm.serve.app import _config_from_args

    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    for app in raw["applications"]:
        assert set(app) <= APP_KEYS, set(app) - APP_KEYS
        assert app["import_path"] == "rayllm.serve.app:build_app"
        cfg = _config_from_args(app["args"])  # rayllm's own validation, every problem at once
        assert cfg.serve is not None


def test_there_is_a_serve_config():
    assert CONFIGS
