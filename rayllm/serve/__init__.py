"""Serving: Ray Serve + vLLM behind an OpenAI-compatible API, with versioned LoRA adapters.

Modules (vLLM and Ray are imported only where they run):
    app.py            Ray Serve deployments (the code replicas run); `build_app` for Serve config files
    deploy.py         deploy onto the connected Ray and wait for /health; `run` for `rayllm serve`
    openai_routes.py  HTTP routes over vLLM's OpenAI protocol types; auth.py, errors.py, metrics.py
    adapters.py       a request's `model` → base / folder adapter / registry version / weighted alias
    folders.py        an adapter → the verified local folder vLLM loads (registry versions checked once)
    residency.py      the adapters one engine holds: lazy load, LRU, leases, drain before unload
    server.py         the engine side of a request; protocol.py the contracts between the layers
    vllm_engine.py    the vLLM engine (AsyncLLM + vLLM's own serving objects)
    compat.py         refuses adapters of another base (fingerprint) or above max_lora_rank
    lora_cpu_fix.py   vLLM plugin fixing CPU multi-LoRA batches (mixed base/adapter rows, prompt logprobs)
"""
