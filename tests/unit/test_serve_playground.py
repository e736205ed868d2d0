"""GET /playground: off unless `serve.playground` is set; a static page that only calls the /v1 routes
(relative URLs, so it works under any route prefix) with the key typed into it."""

from __future__ import annotations

import dataclasses
import re

from fastapi.testclient import TestClient
from tests.unit.serve_fake_engine import make_frontend

from rayllm.config.serve import ServeConfig
from rayllm.serve.auth import Keys
from rayllm.serve.openai_routes import build_app


def test_the_playground_is_off_by_default_and_a_static_page_when_on(tmp_path):
    assert ServeConfig(model="m").playground is False
    front = make_frontend(tmp_path, keys=Keys(api=("user-key",)))
    with TestClient(build_app(front)) as c:
        assert c.get("/playground").status_code == 404
    with TestClient(build_app(dataclasses.replace(front, playground=True))) as c:
        r = c.get("/playground")  # the page itself is public: it holds no data and no key
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "rayllm playground" in r.text and 'id="key"' in r.text
        called = set(re.findall(r'fetch\((?:chat \? )?"([^"]+)"', r.text)) | set(re.findall(r': "(v1/[a-z/]+)"', r.text))
        assert called == {"v1/models", "v1/chat/completions", "v1/completions"}, called
        assert "http://" not in r.text and "https://" not in r.text
        assert c.get("/v1/models").status_code == 401  # what it calls still needs the key
