"""Every client mistake is a 4xx with OpenAI-style error JSON naming the problem; never a 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import make_adapter_dir, make_frontend

from rayllm.serve.auth import Keys
from rayllm.serve.openai_routes import build_app

ADMIN = {"authorization": "Bearer adm"}


@pytest.fixture
def client(tmp_path):
    folders = {
        "good": str(make_adapter_dir(tmp_path / "good", "good")),
        "alien": str(make_adapter_dir(tmp_path / "alien", "alien", fingerprint="sha256:another-base")),
        "wide": str(make_adapter_dir(tmp_path / "wide", "wide", rank=64)),
        "broken": str(make_adapter_dir(tmp_path / "broken", "broken")),
    }
    (tmp_path / "broken" / "weights.txt").unlink()  # FakeEngine's add_lora fails on it
    front = make_frontend(tmp_path, folders=folders, keys=Keys(admin="adm"))
    with TestClient(build_app(front)) as c:
        yield c


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def test_unknown_model_is_404(client):
    err = error_of(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert err["type"] == "NotFoundError" and err["param"] == "model" and "gpt-9" in err["message"]
    err = error_of(client.post("/v1/chat/completions", json={"model": "Nope:Alias", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert "Nope:Alias" in err["message"]


@pytest.mark.parametrize("model", ["../../etc/passwd", "a/b", "..", "x\\y"])
def test_path_like_model_names_are_400(client, model):
    err = error_of(client.post("/v1/completions", json={"model": model, "prompt": "x"}), 400)
    assert err["param"] == "model" and "invalid model name" in err["message"]


@pytest.mark.parametrize("raw,needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_malformed_bodies_are_400(client, raw, needle):
    err = error_of(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
    assert needle in err["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": "base", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "base", "prompt": {"a": 1}}, "prompt"),
    ({"model": "base", "prompt": [-5, 3]}, "prompt"),
    ({"model": "base", "prompt": "x", "stream": "sometimes"}, "stream"),
    ({"model": "base", "prompt": "x", "logprobs": "lots"}, "logprobs"),
    ({"model": "base"}, "prompt"),
])
def test_wrong_types_are_400_naming_the_field(client, body, param):
    err = error_of(client.post("/v1/completions", json=body), 400)
    assert err["param"] == param, err


@pytest.mark.parametrize("extra", [{"temperature": -1}, {"n": 0}, {"top_p": 7}, {"max_tokens": -3}])
def test_out_of_range_sampling_is_400(client, extra):
    err = error_of(client.post("/v1/completions", json={"model": "base", "prompt": "x", **extra}), 400)
    assert err["type"] == "BadRequestError"


def test_chat_without_messages_is_400(client):
    err = error_of(client.post("/v1/chat/completions", json={"model": "base", "messages": "hi"}), 400)
    assert err["param"] == "messages"


def test_prompt_over_context_is_400(client):
    err = error_of(client.post("/v1/completions", json={"model": "base", "prompt": "w " * 80, "max_tokens": 4}), 400)
    assert "maximum context length" in err["message"]


def test_incompatible_adapters_are_400_with_reason_and_others_keep_serving(client):
    err = error_of(client.post("/v1/completions", json={"model": "alien", "prompt": "x"}), 400)
    assert "base fingerprint mismatch" in err["message"] and err["param"] == "model"
    err = error_of(client.post("/v1/completions", json={"model": "wide", "prompt": "x"}), 400)
    assert "rank" in err["message"] and "max_lora_rank 16" in err["message"]
    err = error_of(client.post("/v1/completions", json={"model": "broken", "prompt": "x"}), 400)
    assert "failed to load" in err["message"]
    for model in ("base", "good"):
        assert client.post("/v1/completions", json={"model": model, "prompt": "x"}).status_code == 200


def test_load_route_validates_name_path_and_adapter(client, tmp_path):
    err = error_of(client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "../evil", "lora_path": str(tmp_path)}), 400)
    assert err["param"] == "lora_name" and "path separator" in err["message"]
    error_of(client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "x", "lora_path": 3}), 400)
    error_of(client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "x", "lora_path": str(tmp_path / "none")}), 404)
    error_of(client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "good", "lora_path": str(tmp_path / "good")}), 400)
    alien = str(tmp_path / "alien")
    err = error_of(client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "alien2", "lora_path": alien}), 400)
    assert "fingerprint" in err["message"]
    error_of(client.post("/v1/completions", json={"model": "alien2", "prompt": "x"}), 404)  # a failed load is not listed
    error_of(client.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "never-loaded"}), 404)


def test_engine_down_is_503_on_health(tmp_path):
    front = make_frontend(tmp_path)
    front.backend.core.engine.healthy = False
    with TestClient(build_app(front)) as c:
        assert c.get("/health").status_code == 503
        front.backend.core.engine.healthy = True
        assert c.get("/health").status_code == 200
