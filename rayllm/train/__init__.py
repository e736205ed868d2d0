"""Training layer: Ray Train + DeepSpeed. `launch.run(cfg)` is `rayllm train`, `launch.plan_main(cfg)` is `rayllm plan`.

Modules hold one thing each: batching (global batch arithmetic), schedule (LR), zero (DeepSpeed config),
plan (memory planner), data (prepared shards → micro-batches), spike (rollback policy), metrics (JSONL,
W&B, plot), checkpoint (save / restore), loop (the per-worker function), export (HF folders), launch.
"""
