"""Memory planner: bytes per worker for parameters, gradients, optimizer states, activations and
buffers, for a ZeRO stage and offload — pure functions, checked against DeepSpeed's own estimators.

Notation: Ψ trainable params, F frozen params, L largest single module's params (what ZeRO-3 gathers
at once), N workers, p bytes per weight (2 for bf16/fp16, 4 for fp32). Model states per worker:

    stage | params (device)      | grads (device)        | optimizer (device, or host if offloaded)
    0     | p(Ψ+F)               | pΨ                    | 8Ψ fp32 (m, v) / 16Ψ mixed (+ fp32 master, fp32 grads)
    1     | p(Ψ+F)               | pΨ                    | 16Ψ/N  (fp32 master + fp32 grads + m + v)
    2     | p(Ψ+F)               | pΨ/N (0 if offloaded) | 16Ψ/N
    3     | p(Ψ+F)/N + 2pL       | — (in the fp32 grads) | 16Ψ/N        (params to host with offload_param)

A QLoRA base (quant_bits 4) keeps F's linear weights in NF4, about 0.52 bytes each, not p.
With p = 2 and F = 0 these are exactly DeepSpeed's `estimate_zero2/3_model_states_mem_needs`
(device: 2Ψ + 18Ψ/N for ZeRO-2, 4L + 18Ψ/N for ZeRO-3; host per node with the buffer factor 1).
DeepSpeed keeps an fp32 master copy even when training in fp32, so 16Ψ/N holds at p = 4 as well.
Activations are a rough estimate (±50 %); buffers are DeepSpeed's buckets; the runtime line is the
process itself (CUDA context, or torch + transformers + DeepSpeed resident on CPU). Measured on CPU
(85M-param Llama, fp32, 2 workers, micro-batch 4 × 64): ZeRO-2 planned 2.67 GiB vs 2.38-2.53 GiB
peak RSS; ZeRO-3 planned 2.55 GiB vs 2.85 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2**30
RUNTIME_CPU = 1.0 * GIB  # measured RSS of a worker after importing torch, transformers, deepspeed, ray
RUNTIME_GPU = 0.75 * GIB  # CUDA context + allocator slack on the device


@dataclass(frozen=True)
class Shape:
    total_params: int
    trainable_params: int
    largest_layer_params: int
    num_layers: int
    hidden_size: int
    q_dim: int
    kv_dim: int
    intermediate_size: int
    vocab_size: int
    embedding_params: int = 0  # input embeddings and an untied LM head: never quantized


@dataclass(frozen=True)
class Settings:
    stage: int
    workers: int
    micro_batch: int
    seq_len: int
    dtype_bytes: int
    offload_optimizer: bool = False
    offload_param: bool = False
    gradient_checkpointing: bool = False
    use_gpu: bool = False
    bucket: int = 50_000_000
    accum: int = 1
    quant_bits: int = 0  # 4: a QLoRA base, its frozen linear layers in NF4
    reference_params: int = 0  # DPO full fine-tune: a frozen reference copy (sharded like the params under ZeRO-3)


@dataclass(frozen=True)
class Plan:
    device: dict[str, float]
    host: dict[str, float]

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    def per_worker(self, use_gpu: bool) -> float:
        """What one worker needs of the memory that limits it (on CPU, device and host are one RAM)."""
        return self.device_total if use_gpu else self.device_total + self.host_total


def llama_shape(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, tied: bool,
                head_dim: int | None = None, lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> Shape:
    """Parameter counts of a Llama-style decoder (and of LoRA adapters on the named projections)."""
    hd = head_dim or hidden // heads
    q_dim, kv_dim = heads * hd, kv_heads * hd
    dims = {"q_proj": (hidden, q_dim), "k_proj": (hidden, kv_dim), "v_proj": (hidden, kv_dim), "o_proj": (q_dim, hidden),
            "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}
    per_layer = sum(i * o for i, o in dims.values()) + 2 * hidden
    base = vocab * hidden + layers * per_layer + hidden + (0 if tied else vocab * hidden)
    lora = layers * sum(lora_rank * (i + o) for name, (i, o) in dims.items() if name in lora_targets)
    largest = max([vocab * hidden] + [i * o for i, o in dims.values()])
    return Shape(total_params=base + lora, trainable_params=lora if lora_rank else base, largest_layer_params=largest,
                 num_layers=layers, hidden_size=hidden, q_dim=q_dim, kv_dim=kv_dim, intermediate_size=ffn, vocab_size=vocab,
                 embedding_params=vocab * hidden * (1 if tied else 2))


def t5_shape(d_model: int, d_kv: int, d_ff: int, heads: int, enc_layers: int, dec_layers: int, vocab: int, tied: bool,
             gated: bool, buckets: int = 32, lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> Shape:
    """Parameter counts of a T5 encoder-decoder: per encoder block self-attention + MLP, per decoder
    block self-attention + cross-attention + MLP; one relative position bias per stack; a shared
    embedding (and an LM head unless tied). Activations are sized as enc + dec layers of width d_model."""
    inner = heads * d_kv
    attn = {"q": (d_model, inner), "k": (d_model, inner), "v": (d_model, inner), "o": (inner, d_model)}
    mlp = {"wi_0": (d_model, d_ff), "wi_1": (d_model, d_ff), "wo": (d_ff, d_model)} if gated else {"wi": (d_model, d_ff), "wo": (d_ff, d_model)}

    def count(dims: dict, rank: int = 0) -> int:
        return sum((rank * (i + o) if rank else i * o) for name, (i, o) in dims.items() if not rank or name in lora_targets)

    base = (vocab * d_model + enc_layers * (count(attn) + count(mlp) + 2 * d_model)
            + dec_layers * (2 * count(attn) + count(mlp) + 3 * d_model) + 2 * (buckets * heads + d_model)
            + (0 if tied else vocab * d_model))
    lora = (enc_layers * (count(attn, lora_rank) + count(mlp, lora_rank))
            + dec_layers * (2 * count(attn, lora_rank) + count(mlp, lora_rank))) if lora_rank else 0
    largest = max([vocab * d_model] + [i * o for i, o in {**attn, **mlp}.values()])
    return Shape(total_params=base + lora, trainable_params=lora if lora_rank else base, largest_layer_params=largest,
                 num_layers=enc_layers + dec_layers, hidden_size=d_model, q_dim=inner, kv_dim=inner, intermediate_size=d_ff,
                 vocab_size=vocab, embedding_params=vocab * d_model * (1 if tied else 2))


def shape_from_hf(config: dict, lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> Shape:
    """The Shape of an HF config.json: the Llama family, or T5 (model_type t5 / mt5)."""
    if config.get("model_type") in ("t5", "mt5"):
        return t5_shape(
            config["d_model"], config["d_kv"], config["d_ff"], config["num_heads"], config["num_layers"],
            config.get("num_decoder_layers") or config["num_layers"], config["vocab_size"], config.get("tie_word_embeddings", True),
            str(config.get("feed_forward_proj", "relu")).startswith("gated"), config.get("relative_attention_num_buckets", 32),
            lora_rank, lora_targets,
        )
    return llama_shape(
        config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"], config["intermediate_size"],
        config["vocab_size"], config.get("tie_word_embeddings", True), config.get("head_dim"), lora_rank, lora_targets,
    )


def model_states(shape: Shape, s: Settings) -> tuple[dict[str, float], dict[str, float]]:
    """(device, host) bytes per worker of params, grads and optimizer states (table above)."""
    psi, frozen, p, n = shape.trainable_params, shape.total_params - shape.trainable_params, s.dtype_bytes, s.workers
    device, host = {}, {}
    if s.quant_bits and s.stage < 3:
        device["params"] = p * psi + frozen_4bit_bytes(shape, p)
    elif s.stage < 3:
        device["params"] = p * (psi + frozen)
    else:
        device["params"] = 2 * p * shape.largest_layer_params
        (host if s.offload_param else device)["params_shard"] = p * (psi + frozen) / n
    if s.stage <= 1:
        device["grads"] = p * psi
    elif s.stage == 2 and not s.offload_optimizer:
        device["grads"] = p * psi / n
    if s.stage == 0:
        device["optimizer"] = (8 if p == 4 else 16) * psi
    else:
        (host if s.offload_optimizer else device)["optimizer"] = 16 * psi / n
    if s.reference_params:
        (host if s.offload_param else device)["reference"] = p * s.reference_params / (n if s.stage == 3 else 1)
    return device, host


def frozen_4bit_bytes(shape: Shape, p: int) -> float:
    """A QLoRA base: linear weights as NF4 with double-quantized scales (4 bits + 0.127 bits per
    weight: an 8-bit absmax per 64 weights, an fp32 scale per 256 of those), embeddings in dtype."""
    frozen = shape.total_params - shape.trainable_params
    linear = max(frozen - shape.embedding_params, 0)
    return linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + (frozen - linear) * p


def activation_bytes(shape: Shape, s: Settings) -> float:
    """Activations kept for backward in one micro-batch (sdpa attention: no seq² score matrix)."""
    tokens = s.micro_batch * s.seq_len
    per_layer = (4 * shape.hidden_size + 3 * shape.q_dim + 3 * shape.kv_dim + 4 * shape.intermediate_size) * s.dtype_bytes
    layers = (shape.num_layers * shape.hidden_size * s.dtype_bytes + per_layer) if s.gradient_checkpointing else shape.num_layers * per_layer
    logits = shape.vocab_size * (s.dtype_bytes + 8)  # model logits, fp32 copy for the loss, its gradient
    return tokens * (layers + 3 * shape.hidden_size * s.dtype_bytes + logits)


def plan_memory(shape: Shape, s: Settings) -> Plan:
    device, host = model_states(shape, s)
    device["activations"] = activation_bytes(shape, s)
    bucket = min(s.bucket, max(shape.trainable_params, 1)) * s.dtype_bytes
    # reduce + all-gather buckets; ZeRO-3 also keeps up to one bucket of gathered parameters live
    # (zero.py sets stage3_max_live_parameters to the bucket size)
    device["buffers"] = {0: 1, 1: 2, 2: 2, 3: 3}[s.stage] * bucket
    device["runtime"] = RUNTIME_GPU if s.use_gpu else RUNTIME_CPU
    return Plan(device, host)


def fits(plan: Plan, s: Settings, capacity: tuple[float | None, float | None]) -> bool:
    """Whether a plan fits (device, host) memory per worker; an unknown capacity is not checked.
    On CPU both parts live in host RAM."""
    device_cap, host_cap = capacity
    if not s.use_gpu:
        return host_cap is None or plan.device_total + plan.host_total <= host_cap
    return (device_cap is None or plan.device_total <= device_cap) and (host_cap is None or plan.host_total <= host_cap)


def suggestions(shape: Shape, s: Settings, capacity_for, limit: int = 3) -> list[str]:
    """Changes that would fit, fewest changes first: stage, gradient checkpointing, smaller micro-batch
    (more accumulation, same global batch), offload (GPU only: on CPU it is the same RAM), workers.
    `capacity_for(workers)` is the (device, host) memory per worker with that many workers (None: unknown)."""
    stages = sorted({s.stage, 2, 3} - {x for x in (0, 1, 2) if x < s.stage})
    micros = sorted({s.micro_batch} | {m for m in (1, 2, 4, 8) if m < s.micro_batch and s.micro_batch % m == 0}, reverse=True)
    offloads = [(s.offload_optimizer, s.offload_param)] + ([(True, False), (True, True)] if s.use_gpu else [])
    workers = sorted({s.workers, 1, s.workers * 2, s.workers * 4} if s.use_gpu else {s.workers, max(1, s.workers // 2), 1})
    found = []
    for stage in stages:
        for gc in sorted({s.gradient_checkpointing, True}):
            for micro in micros:
                for off_opt, off_param in offloads:
                    if (off_param and stage < 3) or (off_opt and stage == 0):
                        continue
                    for w in workers:
                        t = replace(s, stage=stage, gradient_checkpointing=gc, micro_batch=micro, accum=s.accum * s.micro_batch // micro,
                                    offload_optimizer=off_opt, offload_param=off_param, workers=w)
                        if t == s:
                            continue
                        cap = capacity_for(w)
                        plan = plan_memory(shape, t)
                        if fits(plan, t, cap):
                            found.append((_changes(s, t), t, plan.per_worker(t.use_gpu)))
    found.sort(key=lambda f: (len(f[0]), f[2]))
    return [f"{', '.join(c)} → {need / GIB:.2f} GiB per worker" for c, _, need in found[:limit]]


def _changes(a: Settings, b: Settings) -> list[str]:
    names = {"stage": "train.zero_stage", "gradient_checkpointing": "train.gradient_checkpointing", "micro_batch": "train.micro_batch_size",
             "accum": "train.gradient_accumulation_steps", "offload_optimizer": "train.offload_optimizer", "offload_param": "train.offload_param",
             "workers": "train.num_workers"}
    out = []
    for field, key in names.items():
        old, new = getattr(a, field), getattr(b, field)
        if old != new:
            value = ("cpu" if new else "none") if field.startswith("offload") else str(new).lower()
            out.append(f"{key}: {value}")
    return out


def deepspeed_model_states(shape: Shape, s: Settings) -> tuple[float, float] | None:
    """DeepSpeed's own estimate (device per worker, host per node) for ZeRO-2/3 with 16-bit weights;
    None for stages it has no estimator for. Imports deepspeed (slow): keep out of hot paths."""
    if s.stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, dev = estimate_zero2_model_states_mem_needs(shape.total_params, s.workers, 1, cpu_offload=s.offload_optimizer,
                                                         additional_buffer_factor=1.0)
        return float(dev), float(cpu)
    if s.stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, dev, _ = estimate_zero3_model_states_mem_needs(
            shape.total_params, shape.largest_layer_params, s.workers, 1, cpu_offload=s.offload_optimizer,
            cpu_offload_params=s.offload_param, zero_init=True, additional_buffer_factor=1.0)
        return float(dev), float(cpu)
    return None
