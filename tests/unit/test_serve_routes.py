"""The OpenAI routes over a FakeEngine: base / folder / registry version / alias resolution,
chat, SSE streaming, model listing, metrics, and hot swaps under concurrent load."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import FakeEngine, make_adapter_dir, make_frontend, sse_events

from rayllm.registry.store import Registry
from rayllm.serve.auth import Keys
from rayllm.serve.openai_routes import build_app


@pytest.fixture
def registry(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    for tag in ("v1-weights", "v2-weights"):
        reg.publish("support", str(make_adapter_dir(tmp_path / "train" / tag, tag)))
    reg.promote("support:prod", {1: 50, 2: 50})
    reg.promote("support:stable", 1)
    return reg


@pytest.fixture
def client(tmp_path, registry):
    folders = {"poet": str(make_adapter_dir(tmp_path / "poet", "poet-weights"))}
    front = make_frontend(tmp_path, folders=folders, registry_root=str(tmp_path / "registry"))
    with TestClient(build_app(front)) as c:
        yield c


def complete(client, model, **kw):
    return client.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 3, **kw})


def test_base_folder_and_registry_versions(client):
    r = complete(client, "base")
    assert r.status_code == 200 and r.json()["model"] == "base"
    assert r.json()["choices"][0]["text"] == "base:0 base:1 base:2"
    r = complete(client, "poet")
    assert r.json()["model"] == "poet" and r.json()["choices"][0]["text"].startswith("poet-weights:0")
    r = complete(client, "support@v1")
    assert r.json()["model"] == "support@v1" and r.json()["choices"][0]["text"].startswith("v1-weights:")
    r = complete(client, "support")  # bare registry name: the newest version, named exactly
    assert r.json()["model"] == "support@v2" and r.json()["choices"][0]["text"].startswith("v2-weights:")
    r = complete(client, "support:stable")
    assert r.json()["model"] == "support@v1"
    assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                                 "prompt_tokens_details": None, "completion_tokens_details": None}


def test_weighted_alias_names_the_version_that_answered(client):
    seen = Counter()
    for _ in range(60):
        body = complete(client, "support:prod").json()
        version = body["model"]
        seen[version] += 1
        assert body["choices"][0]["text"].startswith(version.split("@")[1] + "-weights:")  # never the other's weights
    assert set(seen) == {"support@v1", "support@v2"} and min(seen.values()) >= 15


def test_chat_completion(client):
    r = client.post("/v1/chat/completions", json={"model": "support@v2", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "support@v2"
    assert r.json()["choices"][0]["message"] == {**r.json()["choices"][0]["message"], "role": "assistant",
                                                 "content": "v2-weights:0 v2-weights:1"}


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "a b"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b"}]}),
])
def test_streaming_sse_and_usage_only_when_asked(client, route, body):
    r = client.post(route, json={"model": "poet", "max_tokens": 3, "stream": True, **body})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and all(e["model"] == "poet" for e in events[:-1])
    assert not any(e.get("usage") for e in events[:-1])  # usage is collected internally, not leaked
    r = client.post(route, json={"model": "poet", "max_tokens": 3, "stream": True,
                                 "stream_options": {"include_usage": True}, **body})
    events = sse_events(r.text)
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3


def test_models_lists_base_folders_versions_and_aliases(client):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert {"base", "poet", "support", "support@v1", "support@v2", "support:prod", "support:stable"} <= set(cards)
    assert cards["support@v2"]["version"] == "v2" and cards["support@v2"]["parent"] == "base"
    assert cards["support:prod"]["targets"] == {"support@v1": 0.5, "support@v2": 0.5}


def test_promote_is_picked_up_without_restart(client, registry):
    assert complete(client, "support:stable").json()["model"] == "support@v1"
    registry.promote("support:stable", 2)
    assert complete(client, "support:stable").json()["model"] == "support@v2"  # refresh_s=0 in this test
    registry.rollback("support:stable")
    assert complete(client, "support:stable").json()["model"] == "support@v1"


def test_metrics_per_adapter_version(client):
    complete(client, "support@v1")
    complete(client, "support@v1", stream=True)
    complete(client, "nope")
    text = client.get("/metrics").text
    assert 'rayllm_requests_total{adapter="support",route="completions",status="200",version="v1"} 2.0' in text
    assert 'rayllm_completion_tokens_total{adapter="support",version="v1"} 6.0' in text
    assert 'rayllm_requests_total{adapter="unresolved",route="completions",status="404",version=""} 1.0' in text
    assert 'rayllm_time_to_first_token_seconds_count{adapter="support",version="v1"} 1.0' in text


def test_hot_swap_under_load_no_errors_no_wrong_weights(tmp_path):
    """Streams on `a` run while `a` is reloaded from other folders and `b` is loaded and unloaded:
    every request succeeds, each answer comes from one set of weights, and once a reload returns,
    every new request gets the new weights."""
    import httpx

    folders = [make_adapter_dir(tmp_path / f"a{i}", f"gen{i}") for i in range(4)]
    front = make_frontend(tmp_path, FakeEngine(chunk_delay=0.002), keys=Keys(admin="adm"), folders={"a": str(folders[0])})
    app = build_app(front)
    admin = {"authorization": "Bearer adm"}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            current = {"tag": "gen0"}
            answers, errors = [], []

            async def one(stream: bool):
                expected_at_least = int(current["tag"][3:])
                r = await c.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 5, "stream": stream})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                text = "".join(e["choices"][0]["text"] for e in sse_events(r.text)[:-1]) if stream else r.json()["choices"][0]["text"]
                tags = {w.split(":")[0] for w in text.split()}
                answers.append((expected_at_least, tags))

            async def load_loop():
                for i in (1, 2, 3):
                    await asyncio.sleep(0.03)
                    r = await c.post("/v1/load_lora_adapter", headers=admin,
                                     json={"lora_name": "a", "lora_path": str(folders[i]), "load_inplace": True})
                    assert r.status_code == 200, r.text
                    current["tag"] = f"gen{i}"
                    extra = make_adapter_dir(tmp_path / f"b{i}", f"b{i}")
                    r = await c.post("/v1/load_lora_adapter", headers=admin, json={"lora_name": "b", "lora_path": str(extra)})
                    assert r.status_code == 200, r.text
                    r = await c.post("/v1/unload_lora_adapter", headers=admin, json={"lora_name": "b"})
                    assert r.status_code == 200, r.text

            async def traffic():
                for k in range(12):
                    await asyncio.gather(*(one(stream=(j % 2 == 0)) for j in range(6)))

            await asyncio.gather(traffic(), load_loop())
            return answers, errors

    answers, errors = asyncio.run(main())
    assert errors == []
    assert len(answers) == 72
    for expected_at_least, tags in answers:
        assert len(tags) == 1, tags  # one set of weights per answer
        assert int(next(iter(tags))[3:]) >= expected_at_least  # never weights older than the last finished reload
    assert {t for _, tags in answers for t in tags} >= {"gen0", "gen3"}
