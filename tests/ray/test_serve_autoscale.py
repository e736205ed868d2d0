"""Autoscaling under load on the real stack (Ray Serve + vLLM CPU, the tiny served world):
two clients sending long completions back to back make Serve start a second LLM replica, that replica answers some of them,
and once the load stops Serve scales back to one replica, which still answers.

Which replica served a request is read from Serve's own access log: each LLM replica logs a
`CALL generate OK` line with its replica id and the request id the HTTP response carries as
`x-request-id`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.ray.serve_fixtures import PROMPTS, cached_world, serve_app

pytestmark = pytest.mark.slow

TOKENS = 200  # long requests, not streamed (no SSE for the client to parse), leaving CPU for the second replica to start:
# 45 s under two clients streaming 96 tokens, 30 s under these, 18 s idle (2 cores)
CLIENTS = 2  # with target_ongoing_requests 1, two ongoing requests ask for two replicas


def _complete(url: str, prompt: str, stream: bool = False) -> tuple[int, str, str]:
    """(status, text, request id) of a greedy completion that never stops early."""
    body = {"model": "base", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}
    r = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    if r.status_code != 200 or not stream:
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text, r.headers.get("x-request-id", "")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return r.status_code, text, r.headers.get("x-request-id", "")


def _llm_replicas() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications["rayllm"].deployments["LLMServer"].replica_states)


def _wait(what: str, done, timeout_s: float) -> float:
    start = time.time()
    while not done():
        assert time.time() - start < timeout_s, f"{what} not within {timeout_s} s (replicas {_llm_replicas()})"
        time.sleep(0.25)
    return time.time() - start


def _served_by(log_dir: Path, request_ids: set[str]) -> dict[str, str]:
    """request id -> id of the LLM replica whose access log has it finishing `generate`. The lines
    reach the replica's file under serve/ until vLLM starts in it, then its worker's stderr log."""
    served = {}
    for log in [*log_dir.glob("worker-*.err"), *(log_dir / "serve").glob("replica_rayllm_LLMServer_*.log")]:
        for replica, rid in re.findall(r"rayllm_LLMServer (\S+) (\S+) -- CALL generate OK", log.read_text(errors="replace")):
            if rid in request_ids:
                served[rid] = replica
    return served


@pytest.mark.timeout(240, func_only=True)
@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")  # Serve reads it still
def test_load_starts_a_second_replica_that_serves_then_scales_back(_shared_ray):
    import ray

    from rayllm.config.serve import ServeConfig

    world = cached_world()
    cfg = ServeConfig(
        model=str(world.base), dtype="float32", max_model_len=256, max_num_seqs=8, replica_cpus=0.5, cpu_threads=1,
        autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
                     "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2},
    )
    _shared_ray.ensure()
    log_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    t0 = time.time()
    with serve_app(cfg, None) as url:
        started = time.time() - t0
        prompts = PROMPTS[:CLIENTS]
        alone = {p: _complete(url, p) for p in prompts}  # the answers of the one replica, unloaded
        assert all(status == 200 and len(text) > 0 for status, text, _ in alone.values()), alone
        rid = alone[prompts[0]][2]
        _wait("the unloaded answer in an LLM replica's access log", lambda: rid in _served_by(log_dir, {rid}), 10)
        first = _served_by(log_dir, {rid})[rid]
        results: list[tuple[str, int, str, str]] = []
        stop = threading.Event()

        def load(prompt: str) -> None:
            while not stop.is_set():
                results.append((prompt, *_complete(url, prompt)))

        def by_second() -> list[str]:
            served = _served_by(log_dir, {rid for *_, rid in list(results)})
            return [rid for rid, replica in served.items() if replica != first]

        threads = [threading.Thread(target=load, args=(p,), daemon=True) for p in prompts]
        for t in threads:
            t.start()
        try:
            up = _wait("a second running LLM replica", lambda: _llm_replicas().get("RUNNING", 0) == 2, 90)
            _wait("answers from the second replica", lambda: len(by_second()) >= 3, 30)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        down = _wait("back to one LLM replica", lambda: _llm_replicas() == {"RUNNING": 1}, 60)
        after = _complete(url, prompts[0], stream=True)

    assert all(status == 200 for _, status, _, _ in results), [r for r in results if r[1] != 200][:3]
    assert all(text == alone[prompt][1] for prompt, _, text, _ in results)  # fp32 greedy: the same answer on either replica
    assert after[:2] == alone[prompts[0]][:2]
    served = _served_by(log_dir, {rid for *_, rid in results})
    assert len(served) == len(results), "every answer is traced to the replica that generated it"
    replicas = sorted(set(served.values()))
    assert len(replicas) == 2 and first in replicas, replicas
    counts = {r: list(served.values()).count(r) for r in replicas}
    assert min(counts.values()) >= 3, counts
    print(f"app up {started:.0f} s, second replica running after {up:.0f} s of load, back to one {down:.0f} s after it; "
          f"{len(results)} completions of {TOKENS} tokens, per replica {counts}; total {time.time() - t0:.0f} s")
