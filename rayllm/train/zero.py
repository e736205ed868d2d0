"""The DeepSpeed config dict of a run, derived from `TrainConfig` — one pure function."""

from __future__ import annotations

from rayllm.train.batching import Batching

MAX_BUCKET = 50_000_000  # elements; DeepSpeed's default (5e8) allocates GBs of bucket buffers up front


def bucket_elements(train_cfg, trainable_params: int) -> int:
    """Reduce/all-gather bucket: the configured size, else the trainable params capped at MAX_BUCKET."""
    if train_cfg.bucket_size:
        return train_cfg.bucket_size
    return int(min(MAX_BUCKET, max(trainable_params, 100_000)))


def _offload(device: str, train_cfg) -> dict:
    out = {"device": device}
    if device == "nvme":
        out["nvme_path"] = train_cfg.nvme_path
    if train_cfg.use_gpu:
        out["pin_memory"] = True
    return out


def deepspeed_config(train_cfg, b: Batching, dtype: str, trainable_params: int) -> dict:
    """ZeRO stage, offload, AdamW, clipping, batch sizes and precision, as DeepSpeed reads them.

    The optimizer is torch's AdamW (`torch_adam`) except on GPU with optimizer offload, where
    DeepSpeed's CPU Adam op is much faster: on CPU-only machines that op would be a C++ build per
    fresh machine, and FusedAdam would need a CUDA toolchain. The LR schedule is not here: it is transformers'
    get_scheduler, handed to deepspeed.initialize so checkpoints carry its state.
    """
    bucket = bucket_elements(train_cfg, trainable_params)
    zero: dict = {"stage": train_cfg.zero_stage}
    if train_cfg.zero_stage >= 1:
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket, contiguous_gradients=True, overlap_comm=train_cfg.use_gpu)
    if train_cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(train_cfg.offload_optimizer, train_cfg)
    if train_cfg.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=bucket,
            stage3_param_persistence_threshold=min(bucket, 100_000),
            # DeepSpeed's default keeps up to 1e9 gathered parameters alive: the whole model, for
            # anything this size. Bounding it to one bucket is what makes the memory plan hold.
            stage3_max_live_parameters=bucket,
            stage3_max_reuse_distance=bucket,
            stage3_gather_16bit_weights_on_model_save=True,
        )
        del zero["allgather_bucket_size"]
        if train_cfg.offload_param != "none":
            zero["offload_param"] = _offload(train_cfg.offload_param, train_cfg)
    torch_adam = not (train_cfg.use_gpu and train_cfg.offload_optimizer != "none")
    beta1, beta2 = train_cfg.adam_betas
    config = {
        "train_batch_size": b.global_batch,
        "train_micro_batch_size_per_gpu": b.micro_batch_size,
        "gradient_accumulation_steps": b.gradient_accumulation_steps,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train_cfg.learning_rate, "betas": [beta1, beta2], "eps": train_cfg.adam_eps,
                "weight_decay": train_cfg.weight_decay, "torch_adam": torch_adam,
            },
        },
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if train_cfg.max_grad_norm > 0:
        config["gradient_clipping"] = train_cfg.max_grad_norm
    if torch_adam:
        # torch's AdamW with ZeRO-Offload: DeepSpeed insists on its CPU Adam op unless told otherwise.
        config["zero_force_ds_cpu_optimizer"] = False
    return config
