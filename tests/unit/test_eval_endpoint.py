"""Endpoint targets against a small local OpenAI-style HTTP server (stdlib, in a thread): the key is
checked up front and a refusal is one line, answers come back in order, no more than `concurrency`
requests are in flight, a silent endpoint fails within the connect timeout, and `rayllm eval`
refuses a bad endpoint before anything starts. The real server is exercised in tests/ray."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayllm.config.eval import EndpointConfig
from rayllm.eval import endpoint
from rayllm.eval.targets import EvalError

KEY = "sekrit"


class Handler(BaseHTTPRequestHandler):
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self._send(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
            return False
        return True

    def do_GET(self):
        if self._authorized():
            self._send(200, {"object": "list", "data": [{"id": "base"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorized():
            return
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.peak = max(cls.peak, cls.in_flight)
        time.sleep(0.05)
        with cls.lock:
            cls.in_flight -= 1
        if self.path == "/v1/chat/completions":
            text = "echo: " + body["messages"][-1]["content"]
            self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                             "usage": {"completion_tokens": 3}})
        else:
            self._send(200, {"choices": [{"index": 0, "text": " more " + body["prompt"]}], "usage": {"completion_tokens": 2}})


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Handler.peak = 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_answers_in_order_with_bounded_concurrency(server, monkeypatch):
    monkeypatch.setenv("EVAL_TEST_KEY", KEY)
    e = EndpointConfig(url=server + "/v1", model="base", api_key_env="EVAL_TEST_KEY")
    endpoint.check(e, 2.0, "target 'x'")
    reqs = [{"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4} for i in range(10)] + [{"prompt": "p", "max_tokens": 4}]
    got = endpoint.generate(e, reqs, concurrency=3, connect_timeout_s=2.0, request_timeout_s=10.0, where="target 'x'")
    assert [g["text"] for g in got[:10]] == [f"echo: q{i}" for i in range(10)] and got[10] == {"text": " more p", "tokens": 2}
    assert 1 <= Handler.peak <= 3


def test_a_refused_key_is_one_line_naming_the_variable(server, monkeypatch):
    monkeypatch.setenv("EVAL_TEST_KEY", "wrong")
    e = EndpointConfig(url=server, model="base", api_key_env="EVAL_TEST_KEY")
    with pytest.raises(EvalError) as err:
        endpoint.check(e, 2.0, "eval target 'prod'")
    assert str(err.value) == f"eval target 'prod': {server} refused the key in $EVAL_TEST_KEY (HTTP 401)"
    with pytest.raises(EvalError, match=r"refused requests without a key \(set endpoint.api_key_env\) \(HTTP 401\)"):
        endpoint.check(EndpointConfig(url=server, model="base"), 2.0, "t")


def test_a_silent_endpoint_fails_within_the_connect_timeout():
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(EvalError, match=r"did not answer within 1 s \(eval.connect_timeout_s\)"):
            endpoint.check(EndpointConfig(url=url, model="m"), 1.0, "t")
        assert time.perf_counter() - t0 < 4


def test_rayllm_eval_refuses_a_bad_endpoint_before_anything_starts(server, monkeypatch, tmp_path, capsys):
    import yaml

    from rayllm.cli import main

    monkeypatch.setenv("EVAL_TEST_KEY", "wrong")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "hi", "reference": "yo"}) + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"eval": {"output_dir": str(tmp_path / "out"), "generation": [{"name": "qa", "path": str(qa)}],
                                            "targets": [{"endpoint": {"url": server, "model": "base", "api_key_env": "EVAL_TEST_KEY"}}]}}))
    assert main(["eval", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rayllm: eval: eval target 'base': {server} refused the key in $EVAL_TEST_KEY (HTTP 401)"
    assert not (tmp_path / "out").exists()
    import sys

    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_rayllm_eval_scores_an_endpoint_and_counts_bad_rows(server, monkeypatch, tmp_path):
    import yaml

    from rayllm.cli import main

    monkeypatch.setenv("EVAL_TEST_KEY", KEY)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join([json.dumps({"prompt": "paris", "reference": "echo: Paris!"}), "{broken",
                             json.dumps({"prompt": "x"}), json.dumps({"prompt": "y", "reference": "z"})]) + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"eval": {"name": "ep", "output_dir": str(tmp_path / "out"), "generation": [{"name": "qa", "path": str(qa)}],
                                            "targets": [{"endpoint": {"url": server, "model": "base", "api_key_env": "EVAL_TEST_KEY"},
                                                         "label": "served"}]}}))
    assert main(["eval", str(cfg)]) == 0
    report = json.loads((tmp_path / "out" / "ep" / "eval.json").read_text())
    assert report["metrics"]["served"]["qa/exact_match"] == 50.0  # "echo: paris" == "echo: Paris!" after normalisation
    assert report["tasks"]["qa"]["rows"] == 2 and report["tasks"]["qa"]["bad_by_reason"] == {"invalid_json": 1, "missing_field": 1}
