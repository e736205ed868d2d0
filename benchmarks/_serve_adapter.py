"""A published adapter served beside its base through rayllm's endpoint (Ray Serve + vLLM, the app
`rayllm serve` runs), both asked the same chat prompts greedily: how the SmolLM2 benchmarks compare
a trained adapter with its base on held-out questions. Runs on this process's Ray."""

from __future__ import annotations


def ask_base_and_adapter(base: str, registry_root: str, ref: str, conversations: list[list[dict]], max_tokens: int,
                         max_lora_rank: int = 16) -> dict[str, list[dict]]:
    """{"base": answers, ref: answers}, one {"text", "completion_tokens"} per conversation, in order."""
    import requests

    from rayllm.config.serve import ServeConfig
    from tests.ray.serve_fixtures import serve_app

    serve = ServeConfig(model=base, served_model_name="base", dtype="float32", max_model_len=512, max_lora_rank=max_lora_rank,
                        replica_cpus=1, preload_adapters=[ref])
    answers: dict[str, list[dict]] = {"base": [], ref: []}
    with serve_app(serve, registry_root) as url:
        for messages in conversations:
            for model, out in answers.items():
                r = requests.post(f"{url}/v1/chat/completions", json={"model": model, "messages": messages, "temperature": 0,
                                                                       "max_tokens": max_tokens}, timeout=120)
                r.raise_for_status()
                body = r.json()
                out.append({"text": body["choices"][0]["message"]["content"],
                            "completion_tokens": body["usage"]["completion_tokens"]})
    return answers
