"""Serving throughput: rayllm (Ray Serve + vLLM) against the plain vLLM OpenAI server, side by side.

    .venv/bin/python benchmarks/serve_throughput.py              # SmolLM2-135M, 8 adapters (~10 min)
    .venv/bin/python benchmarks/serve_throughput.py --quick      # the 2-layer test model (~4 min)
    .venv/bin/python benchmarks/serve_throughput.py --hot-only   # adapter hot-load only, one round (~3 min)

Same model, dtype, engine settings and load for both servers: `--requests` streaming completions
of `--max-tokens` tokens at `--concurrency`, base-only traffic and traffic spread over 8 LoRA
adapters, each server measured `--rounds` times in alternation with the other. Reports output
tokens/s and time to first token (p50/p99) and the rayllm/vLLM ratio; then adapter hot-load
latency (load route, first request on a new version vs a warm one; medians of 5 loads). Both servers run the
rayllm vLLM plugin (it is installed in the environment): the CPU mixed-batch fix is a
correctness fix, and a baseline without it answers adapter traffic wrongly.

Every timed load is guarded (_quiet.py, shared by all benchmarks): it waits (up to --wait-quiet s)
for a quiet machine, and the cores used by processes outside this benchmark's tree (which holds
both servers and the Ray it starts) are printed beside each figure with the CPU capability. A
round where others used more than 0.25 core in a window is contended; ratios come from clean
rounds only (medians), and with none there is no ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _quiet import WAIT_LIMIT, Figure, cpu_capability, note, ratio, window  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ray.serve_fixtures import build_adapter, cached_world, free_port  # noqa: E402


def machine() -> str:
    from rayllm.dtypes import bf16_supported

    return (f"CPU capability {cpu_capability()}, bf16 {'yes' if bf16_supported(False) else 'no'}, "
            f"{os.cpu_count()} cores")


async def load(url: str, models: list[str], n: int, max_tokens: int, concurrency: int, prompt: str) -> dict:
    """`n` streaming completions, `concurrency` at a time, models assigned round-robin."""
    import httpx

    ttfts, tokens, errors = [], 0, 0
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, client: httpx.AsyncClient):
        nonlocal tokens, errors
        body = {"model": models[i % len(models)], "prompt": f"{prompt} {i}", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with sem:
            t0 = time.perf_counter()
            first = None
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
                    if r.status_code != 200:
                        errors += 1
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if first is None and event["choices"] and event["choices"][0]["text"]:
                            first = time.perf_counter() - t0
                        if event.get("usage"):
                            tokens += event["usage"]["completion_tokens"]
            except httpx.HTTPError:
                errors += 1
                return
            ttfts.append(first if first is not None else time.perf_counter() - t0)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        await one(0, client)  # warm-up (also loads a lazily loaded adapter)
        tokens = 0
        ttfts.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(n)))
        wall = time.perf_counter() - t0
    ttfts.sort()
    return {"tok_s": tokens / wall, "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("nan"),
            "errors": errors, "tokens": tokens, "wall_s": wall}


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited during start")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} did not become healthy")


class PlainVLLM:
    """`python -m vllm.entrypoints.openai.api_server` with the same engine settings."""

    def __init__(self, base: Path, adapters: dict[str, Path], dtype: str, max_loras: int, max_model_len: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name", "base",
               "--dtype", dtype, "--max-model-len", str(max_model_len), "--enforce-eager", "--enable-lora",
               "--max-loras", str(max_loras), "--max-lora-rank", "16", "--max-cpu-loras", str(max(max_loras, len(adapters) + 2)),
               "--port", str(self.port), "--disable-log-stats", "--lora-modules",
               *[f"{n}={p}" for n, p in adapters.items()]]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-bench-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        wait_healthy(self.url, self.proc)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)  # the server's whole session: engine and Ray processes too
        self.log.close()


class RayllmServe(PlainVLLM):
    """`python -m rayllm serve CONFIG`, as a user starts the endpoint (its own local Ray, direct ingress)."""

    def __init__(self, serve: dict, registry_root: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / f"serve-{self.port}.yaml"
        config.write_text(json.dumps({"serve": {**serve, "port": self.port}, "registry": {"path": str(registry_root)}}))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.log = open(workdir / f"rayllm-serve-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "rayllm", "serve", str(config)], env=env, cwd=workdir,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)


HOT_TRIALS = 5


def each_above(h: dict) -> str:
    return ", ".join(f"{1000 * t['above_s']:.0f}" for t in h["trials"])


def hot_load(url: str, admin: dict, folder: Path, prompt: str, trials: int = HOT_TRIALS) -> dict:
    """Load the adapter under a new name, ask it once, then five warm requests, unload it; `trials`
    times. Medians over the trials of the load route, the first request, the warm median and of each
    trial's load + first − warm (a single load is a 60-80 ms figure whose spread between two loads is
    10-20 ms on 2 cores). A new name each trial: vLLM keys its prefix cache by adapter, so every first
    request misses it as a truly new adapter's would."""
    import requests

    def request(model: str) -> float:
        t = time.perf_counter()
        r = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    runs = []
    for i in range(trials):
        name = f"hotload{i}"
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)}, headers=admin)
        load_s = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        first = request(name)
        warm = statistics.median(request(name) for _ in range(5))
        requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=admin)
        runs.append({"load_s": load_s, "first_s": first, "warm_s": warm, "above_s": load_s + first - warm})
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"trials": runs}


def lazy_first_request(url: str, ref: str, prompt: str) -> tuple[float, float]:
    """(first request on a registry version not loaded yet, median warm request), seconds."""
    import requests

    def request() -> float:
        t = time.perf_counter()
        r = requests.post(f"{url}/v1/completions", json={"model": ref, "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    return request(), statistics.median(request() for _ in range(5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 2-layer test model instead of SmolLM2-135M")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per server")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has it, else fp32")
    ap.add_argument("--cpu-threads", type=int, help="rayllm's serve.cpu_threads (default: its own default)")
    ap.add_argument("--topologies", default="split,single", help="rayllm topologies to measure (serve.topology)")
    ap.add_argument("--hot-only", action="store_true", help="measure adapter hot-load only (one round, no throughput loads)")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--wait-quiet", type=float, default=WAIT_LIMIT,
                    help=f"before each timed load, wait up to this many seconds for a quiet machine (default {WAIT_LIMIT:.0f})")
    args = ap.parse_args()

    from rayllm.config.serve import ServeConfig
    from rayllm.model import resolve_base
    from rayllm.registry.store import Registry
    from rayllm.serve.vllm_engine import resolve_dtype

    dtype = resolve_dtype(args.dtype, on_gpu=False)  # the serving engine's own rule, for both servers
    if args.quick:
        world = cached_world(extra_adapters=8)
        base, adapters = world.base, {f"x{i}": world.adapters[f"x{i}"] for i in range(8)}
        prompt, model_name = "the cat sees", "tiny 2-layer Llama (d=64)"
    else:
        base = resolve_base("smollm2")
        root = Path.home() / ".cache" / "rayllm" / "bench-smollm2-adapters"
        adapters = {f"x{i}": root / f"x{i}" for i in range(8)}
        for i, (name, folder) in enumerate(adapters.items()):
            if not (folder / "rayllm_adapter.json").is_file():
                build_adapter(base, folder, seed=100 + i, scale=0.02)
        prompt, model_name = "Write one sentence about the sea.", "SmolLM2-135M-Instruct"
    mixed = list(adapters)
    print(f"# serve_throughput: {model_name}, dtype {dtype}, {machine()}, rayllm cpu_threads {args.cpu_threads or 'default'}")
    print(f"# {args.requests} streaming requests x {args.max_tokens} tokens, concurrency {args.concurrency}, "
          f"{args.rounds} alternating rounds; base-only vs {len(mixed)} adapters round-robin", flush=True)

    cap = cpu_capability()
    results: dict[str, list[dict]] = {}
    figures: dict[str, list[Figure]] = {}

    def bench(server: str, url: str) -> None:
        for traffic, models in (("base-only", ["base"]), ("8 adapters", mixed)):
            with window(args.wait_quiet) as w:
                r = asyncio.run(load(url, models, args.requests, args.max_tokens, args.concurrency, prompt))
            f = w.figure(r["tok_s"])
            r.update(others=f.others, contended=f.contended)
            results.setdefault(f"{server}|{traffic}", []).append(r)
            figures.setdefault(f"{server}|{traffic}", []).append(f)
            print(f"  {server:14s} {traffic:11s} {r['tok_s']:7.1f} tok/s  TTFT p50 {1000 * r['ttft_p50']:6.0f} ms  "
                  f"p99 {1000 * r['ttft_p99']:6.0f} ms  errors {r['errors']}; {note(f, cap)}", flush=True)

    def timed_hot(name: str, fn, *a) -> None:
        with window(args.wait_quiet) as w:
            out = fn(*a)
        hot[name], hot_figs[name] = out, w.figure(0.0)

    registry_root = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-registry-{os.getpid()}"
    registry = Registry(str(registry_root))
    registry.publish("fresh", str(adapters["x7"]))
    serve = {"model": str(base), "dtype": dtype, "max_model_len": 512, "max_loras": 8, "max_cpu_loras": 10,
             "max_lora_rank": 16, "adapters": {n: str(p) for n, p in adapters.items()}, "admin_key": "bench",
             "replica_cpus": 1, "lora_roots": [str(adapters["x3"].parent)],
             # loaded at start, as plain vLLM loads its --lora-modules: otherwise each round's first
             # mixed requests wait for 8 lazy loads that the other side never does
             "preload_adapters": list(adapters)}
    if args.cpu_threads:
        serve["cpu_threads"] = args.cpu_threads
    ServeConfig.model_validate(serve)
    topologies = args.topologies.split(",")
    servers = ["vllm", *(f"rayllm-{t}" for t in topologies)]
    hot, hot_figs = {}, {}
    rounds = 1 if args.hot_only else args.rounds
    if args.hot_only:  # the state a throughput round leaves: every adapter loaded and used once
        def bench(server: str, url: str) -> None:
            asyncio.run(load(url, mixed, len(mixed), 1, len(mixed), prompt))
    for rnd in range(rounds):
        print(f"round {rnd + 1}: plain vLLM", flush=True)
        with PlainVLLM(base, adapters, dtype, 8, 512) as plain:
            bench("vllm", plain.url)
            if rnd == 0:
                timed_hot("vllm", hot_load, plain.url, {}, adapters["x3"], prompt)
        for topology in topologies:
            name = f"rayllm-{topology}"
            print(f"round {rnd + 1}: {name}", flush=True)
            with RayllmServe({**serve, "topology": topology}, registry_root, registry_root.parent / "bench-serve") as server:
                url = server.url
                bench(name, url)
                if rnd == 0:
                    timed_hot(name, hot_load, url, {"authorization": "Bearer bench"}, adapters["x3"], prompt)
                    timed_hot(f"{name}-lazy", lazy_first_request, url, "fresh@v1", prompt)

    def clean_median(server: str, traffic: str, key: str, rounds: list[int]) -> str:
        xs = results[f"{server}|{traffic}"]
        return f"{1000 * statistics.median(xs[i][key] for i in rounds):.0f}" if rounds else "-"

    if args.hot_only:
        for server in servers:
            h, f = hot[server], hot_figs[server]
            print(f"{server}: hot load: load route {1000 * h['load_s']:.0f} ms, first request {1000 * h['first_s']:.0f} ms, "
                  f"warm {1000 * h['warm_s']:.0f} ms (1 token): {1000 * h['above_s']:.0f} ms above warm "
                  f"(medians of {len(h['trials'])} loads; each: {each_above(h)}); "
                  f"{note(f, cap)}")
            if f"{server}-lazy" in hot:
                (first, warm), f = hot[f"{server}-lazy"], hot_figs[f"{server}-lazy"]
                print(f"{server}: lazy load, first request on registry version fresh@v1 {1000 * first:.0f} ms, warm "
                      f"{1000 * warm:.0f} ms; {note(f, cap)}")
        return
    print(f"\n## {model_name}, dtype {dtype}, {machine()}; figures: medians over clean rounds (others <= 0.25 core)")
    print("| traffic | " + " | ".join(f"{s} tok/s" for s in servers) + " | " + " | ".join(f"{s}/vllm" for s in servers[1:])
          + " | " + " | ".join(f"{s} TTFT p50/p99 ms" for s in servers) + " |")
    print("|---" * (1 + 3 * len(servers) - 1) + "|")
    for traffic in ("base-only", "8 adapters"):
        figs = {s: figures[f"{s}|{traffic}"] for s in servers}
        tok, ttft = [], []
        for s in servers:
            own = [i for i, f in enumerate(figs[s]) if not f.contended]
            tok.append(f"{statistics.median(figs[s][i].value for i in own):.1f}" if own else "no clean round")
            ttft.append(f"{clean_median(s, traffic, 'ttft_p50', own)} / {clean_median(s, traffic, 'ttft_p99', own)}")
        ratios = [ratio(figs[s], figs["vllm"]).text() for s in servers[1:]]
        print(f"| {traffic} | " + " | ".join(tok) + " | " + " | ".join(f"**{r}**" for r in ratios) + " | " + " | ".join(ttft) + " |")
    errors = sum(x["errors"] for xs in results.values() for x in xs)
    print(f"errors: {errors}; CPU capability {cap}")
    for server in servers:
        mixed_vs_base = ratio(figures[f"{server}|8 adapters"], figures[f"{server}|base-only"]).text()
        h, f = hot[server], hot_figs[server]
        print(f"{server}: 8-adapter traffic vs base-only: {mixed_vs_base}; hot load: load route {1000 * h['load_s']:.0f} ms, "
              f"first request {1000 * h['first_s']:.0f} ms, warm {1000 * h['warm_s']:.0f} ms (1 token): {1000 * h['above_s']:.0f} ms "
              f"above warm (medians of {len(h['trials'])} loads); {note(f, cap)}")
        if f"{server}-lazy" in hot:
            (first, warm), f = hot[f"{server}-lazy"], hot_figs[f"{server}-lazy"]
            print(f"{server}: lazy load, first request on registry version fresh@v1 {1000 * first:.0f} ms, warm {1000 * warm:.0f} ms; "
                  f"{note(f, cap)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model_name, "dtype": dtype, "machine": machine(),
                                              "results": results, "hot": hot}, indent=2))


if __name__ == "__main__":
    main()
