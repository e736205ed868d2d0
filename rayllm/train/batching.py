"""Global batch arithmetic: one pure function, printed at launch and checked against the dataset."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Batching:
    micro_batch_size: int
    gradient_accumulation_steps: int
    num_workers: int
    seq_len: int

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, all workers together."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.num_workers

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def epochs(self, max_steps: int, train_sequences: int) -> float:
        return max_steps * self.global_batch / train_sequences

    def describe(self, max_steps: int, train_sequences: int) -> str:
        return (
            f"global batch {self.global_batch} sequences = micro {self.micro_batch_size} × accum "
            f"{self.gradient_accumulation_steps} × workers {self.num_workers}; {self.tokens_per_step:,} tokens/step; "
            f"{max_steps} steps = {self.epochs(max_steps, train_sequences):.2f} epochs of {train_sequences:,} sequences"
        )


def batching(train_cfg, seq_len: int) -> Batching:
    """The batching of a `TrainConfig` on a dataset of sequences of `seq_len` tokens."""
    return Batching(train_cfg.micro_batch_size, train_cfg.gradient_accumulation_steps, train_cfg.num_workers, seq_len)


def check_batching(b: Batching, train_sequences: int, val_sequences: int) -> list[str]:
    """Problems (key, value, fix) that make a batching unusable on this dataset; empty when fine."""
    problems = []
    if b.global_batch > train_sequences:
        problems.append(
            f"train.micro_batch_size × gradient_accumulation_steps × num_workers = {b.global_batch} exceeds the "
            f"{train_sequences} train sequences of the dataset; lower one of them or prepare more data"
        )
    if val_sequences < b.micro_batch_size * b.num_workers:
        problems.append(
            f"the val split has {val_sequences} sequences, fewer than micro_batch_size × num_workers = "
            f"{b.micro_batch_size * b.num_workers}; lower train.micro_batch_size or raise data.val_fraction"
        )
    return problems


def eval_micro_batches(b: Batching, eval_batches: int, val_sequences: int) -> int:
    """Validation micro-batches per worker: eval_batches, or fewer when the val split is smaller."""
    return max(0, min(eval_batches, val_sequences // (b.micro_batch_size * b.num_workers)))
