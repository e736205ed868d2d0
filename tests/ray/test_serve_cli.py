"""`rayllm serve CONFIG` exactly as a user runs it: a subprocess with its own embedded Ray, an
OpenAI client against it, a registry adapter and a config adapter, then SIGTERM and a clean exit.
It runs the default topology, `single` here (the LLM replica answers HTTP on serve.port itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import yaml

from tests.ray.serve_fixtures import PROMPTS, cached_world, free_port

pytestmark = pytest.mark.slow


@pytest.mark.timeout(420)
def test_rayllm_serve_cli_end_to_end(tmp_path):
    import openai

    from rayllm.registry.store import Registry

    world = cached_world()
    Registry(str(tmp_path / "registry")).publish("a", str(world.adapters["a"]))
    port = free_port()
    config = {
        "serve": {"model": str(world.base), "dtype": "float32", "max_model_len": 256, "port": port, "cpu_threads": 1,
                  "adapters": {"b": str(world.adapters["b"])}, "preload_adapters": ["a@v1"], "replica_cpus": 1},
        # the default topology (single here) with the replica on serve.port itself; test_serve_stack.py covers split
        "registry": {"path": "registry"},  # relative: resolved where `rayllm serve` runs
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1", "RAYLLM_API_KEYS": "cli-key"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rayllm", "serve", "serve.yaml"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # the proxy may be up before the app is
                pass
            assert time.time() < deadline, "rayllm serve did not become healthy"
            time.sleep(2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
        assert {"base", "b", "a", "a@v1"} <= {m.id for m in client.models.list().data}
        for model in ("base", "b", "a"):
            r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0)
            assert r.model == ("a@v1" if model == "a" else model) and r.usage.completion_tokens >= 1
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert f"serving base at http://127.0.0.1:{port}/v1" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only the process group this test started
        log.close()
