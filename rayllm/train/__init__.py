"""Training layer: Ray Train + DeepSpeed. `launch.run(cfg)` is `rayllm train`, `launch.plan_main(cfg)` is `rayllm plan`.

Modules hold one thing each. On the driver: preflight (every check before Ray), plan (memory
planner), batching (global batch arithmetic), spec (the RunSpec every worker receives), trainer
(the TorchTrainer), run_store (where a run lives), launch. On the workers: worker (setup → steps →
finish), loop (the step loop: step, spike rollback, log, evaluate, save), zero (DeepSpeed config),
schedule (LR), data (prepared shards → micro-batches), seq2seq (encoder-decoder batches), spike
(rollback policy and its test hook), metrics (JSONL, W&B, plot, MFU), checkpoint (save / restore),
export (HF folders and adapters).
"""
