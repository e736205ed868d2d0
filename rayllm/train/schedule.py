"""Learning-rate schedule: transformers' `get_scheduler` (warmup, then cosine/linear/constant)."""

from __future__ import annotations


def build_scheduler(train_cfg, optimizer):
    """The LambdaLR that DeepSpeed steps once per optimizer step."""
    from transformers import get_scheduler

    return get_scheduler(
        train_cfg.lr_scheduler_type, optimizer,
        num_warmup_steps=train_cfg.warmup_steps, num_training_steps=train_cfg.max_steps,
    )


def rescale(scheduler, factor: float) -> None:
    """Multiply the schedule's peak LR (and the current LR) by `factor`, as after a loss-spike rollback.

    LambdaLR computes lr = base_lr × lambda(step), and base_lrs is part of its state_dict, so the
    scaled peak is saved with later checkpoints and survives a resume without being applied twice.
    """
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
