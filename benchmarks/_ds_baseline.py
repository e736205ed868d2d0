"""The baseline side of train_overhead.py: a plain DeepSpeed training loop, started by DeepSpeed's own
launcher (one process per rank, no Ray), on exactly what rayllm's workers receive.

    deepspeed --num_accelerators 2 benchmarks/_ds_baseline.py --spec SPEC.pkl

SPEC.pkl holds `spec` (the `rayllm.train.spec.RunSpec` every Ray Train worker receives), `steps`,
`warmup` and `out`. From it this script builds the same model (`build_model`,
same ModelConfig and seed), the same DeepSpeed config (`rayllm.train.zero.deepspeed_config`), the
same AdamW groups and LR schedule, and reads the same parquet shards in the same order and batch
shape (rayllm's reader). The loop is the minimal one: forward, token-mean cross-entropy,
`engine.backward`, `engine.step`, `loss.item()`. Rank 0 times steps warmup+1..steps (wall clock
after step `warmup` to after the last step) and writes the result to `out`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="Pickle written by train_overhead.py.")
    ap.add_argument("--local_rank", type=int, default=0, help="Passed by the deepspeed launcher.")
    args = ap.parse_args()
    spec = pickle.loads(Path(args.spec).read_bytes())
    run = spec["spec"]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", run.torch_extensions_dir)

    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from rayllm.dtypes import resolve_dtype
    from rayllm.model import build_model, load_tokenizer
    from rayllm.train.data import PackedSplit, StreamOrder, micro_slice
    from rayllm.train.worker import param_groups
    from rayllm.train.schedule import build_scheduler
    from rayllm.train.zero import deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")  # what Ray Train's TorchConfig uses on CPU
    rank, world = dist.get_rank(), dist.get_world_size()
    tcfg, mcfg, b = run.train, run.model, run.batching
    dtype = resolve_dtype(mcfg.dtype, use_gpu=False)  # the same `auto` rule as the rayllm workers
    tokenizer = load_tokenizer(run.tokenizer_dir)
    model = build_model(mcfg, tokenizer, dtype, seed=tcfg.seed)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, tcfg.weight_decay),
        config=deepspeed_config(tcfg, b, dtype, run.planned_trainable_params),
        lr_scheduler=lambda opt: build_scheduler(tcfg, opt),
    )
    train = PackedSplit.read(run.dataset, "train")
    order = StreamOrder(len(train), tcfg.seed)

    steps, warmup = spec["steps"], spec["warmup"]
    losses, t_start = [], None
    for step in range(1, steps + 1):
        idx = order.global_batch(step - 1, b.global_batch)
        for m in range(b.gradient_accumulation_steps):
            batch = train.batch(micro_slice(idx, m, rank, world, b.micro_batch_size), tcfg.document_masking)
            logits = engine(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
        if step == warmup:
            t_start = time.time()
    t_end = time.time()
    if rank == 0:
        result = {"tokens_per_s": (steps - warmup) * b.tokens_per_step / (t_end - t_start), "seconds": t_end - t_start,
                  "t_start": t_start, "t_end": t_end, "dtype": dtype, "world": world, "torch_threads": torch.get_num_threads(),
                  "loss_start": losses[warmup - 1], "loss_end": losses[-1]}
        Path(spec["out"]).write_text(json.dumps(result, indent=2))
        print(f"[baseline] {result}", flush=True)


if __name__ == "__main__":
    main()
