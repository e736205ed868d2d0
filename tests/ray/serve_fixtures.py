"""A tiny served world built in seconds: a 2-layer Llama (d=64) with its own byte-level BPE and chat
template, briefly trained so its greedy answers are decisive, and LoRA adapters that answer
differently (random B matrices scaled up), each with the `rayllm_adapter.json` training writes.

Used by tests/ray/test_serve_*.py and benchmarks/serve_throughput.py. Importing this module is
cheap; `build_world(dir)` does the work and reuses a folder that is already complete.
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the river", "a small bird", "the king", "our teacher"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "carries", "remembers", "watches"]
OBJECTS = ["the moon", "a red apple", "the green door", "an open book", "the tall tree", "a quiet song", "the sea"]
PROMPTS = [
    "the cat sees",
    "a dog likes the",
    "my sister paints",
    "the king remembers a",
    "our teacher watches the",
    "the river carries",
]
CHAT = [{"role": "user", "content": "the old man finds"}]


@dataclass(frozen=True)
class World:
    base: Path
    adapters: dict[str, Path]  # name -> PEFT folder with rayllm_adapter.json


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        + (f" and {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." if rng.random() < 0.5 else ".")
        for _ in range(n)
    ]


def build_base(out: Path, steps: int = 150, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayllm.config.data import TokenizerConfig
    from rayllm.data.tokenizer import train_tokenizer

    texts = corpus(seed=seed)
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=384, min_frequency=2), out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    ids = [t for text in texts for t in [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    seq = 64
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    return out


def build_adapter(base: Path, out: Path, seed: int, rank: int = 8, scale: float = 0.3, fingerprint: str | None = None) -> Path:
    """A random LoRA whose B matrices are large enough that greedy answers differ from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rayllm.model import base_fingerprint
    from rayllm.registry.fingerprint import METADATA_FILE

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    peft_model.save_pretrained(out)
    meta = {
        "base_fingerprint": fingerprint or base_fingerprint(base),
        "base_model": str(base),
        "rank": rank,
        "target_modules": modules,
        "config_hash": f"test-seed-{seed}",
        "metrics": {"val_loss": 1.0 + seed / 100},
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return out


ADAPTER_SPECS = {"a": dict(seed=1), "b": dict(seed=2), "a2": dict(seed=3), "wide": dict(seed=4, rank=32),
                 "alien": dict(seed=5, fingerprint="sha256:0000000000000000000000000000dead")}


def build_world(root: Path, extra_adapters: int = 0) -> World:
    """Base + adapters a, b (rank 8), a2 (another set of weights), wide (rank 32), alien (other base),
    and `extra_adapters` more (x0, x1, ...) for benchmarks. Reuses a complete folder; built in a
    temp folder renamed into place, so concurrent builders never see half a world."""
    root = Path(root)
    specs = {**ADAPTER_SPECS, **{f"x{i}": dict(seed=100 + i) for i in range(extra_adapters)}}
    world = World(root / "base", {name: root / "adapters" / name for name in specs})
    if (root / "DONE").exists():
        return world
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    build_base(tmp / "base")
    for name, kw in specs.items():
        build_adapter(tmp / "base", tmp / "adapters" / name, **kw)
    for meta in (tmp / "adapters").glob("*/rayllm_adapter.json"):  # paths as they will be after the rename
        meta.write_text(meta.read_text().replace(str(tmp), str(root)))
    (tmp / "DONE").write_text("ok")
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return world


def cached_world(extra_adapters: int = 0) -> World:
    """The world in ~/.cache/rayllm, keyed by this file and rayllm/model.py (the fingerprint's code)."""
    import hashlib

    import rayllm.model

    key = hashlib.sha256(Path(__file__).read_bytes() + Path(rayllm.model.__file__).read_bytes()).hexdigest()[:12]
    return build_world(Path.home() / ".cache" / "rayllm" / f"serve-world-{key}-x{extra_adapters}", extra_adapters)


def hf_greedy(base: Path, prompt_ids: list[int], max_new: int, adapter: Path | None = None) -> list[int]:
    """Reference greedy continuation with transformers (+PEFT), never stopping at EOS (vLLM's ignore_eos)."""
    import torch

    model = _hf_model(base, adapter)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def _hf_model(base: Path, adapter: Path | None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def hf_prompt_logprobs(base: Path, ids: list[int], adapter: Path | None = None) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, as lm-eval's loglikelihood computes it."""
    import torch

    with torch.no_grad():
        logits = _hf_model(base, adapter)(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(serve_cfg, registry_root: str | None, num_cpus: int = 2, start_timeout_s: float = 300):
    """Serve (on a free port) running rayllm's app on this process's Ray — the test session's shared
    one (tests/shared_ray.py) when it runs, else a private local Ray started here; yields the base URL.

    Ends exactly what it started: the Serve instance, and the Ray if it initialised one, never other Rays.
    """
    import ray
    from ray import serve
    from ray.serve.api import _run

    from rayllm.serve.app import build_application

    env = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",  # as `rayllm serve` runs it
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",  # no load balancer to wait for in tests
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: os.environ.get(k, v) for k, v in env.items()})
    port = free_port()
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _run(build_application(serve_cfg, registry_root), name="rayllm", route_prefix="/", _blocking=False)
        deadline = time.time() + start_timeout_s
        while True:  # a deadline instead of serve.run's open-ended wait: a broken engine fails the test
            status = serve.status().applications["rayllm"].status
            if status == "RUNNING":
                break
            if status in ("DEPLOY_FAILED", "UNHEALTHY") or time.time() > deadline:
                raise RuntimeError(f"rayllm app did not start: {serve.status().applications['rayllm']}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            if own_ray:
                ray.shutdown()
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


if __name__ == "__main__":
    import sys
    import time

    t = time.time()
    w = build_world(Path(sys.argv[1])) if len(sys.argv) > 1 else cached_world()
    print(w, f"{time.time() - t:.1f}s")
