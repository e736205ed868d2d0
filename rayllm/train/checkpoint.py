"""Save and restore everything a run needs to continue exactly: DeepSpeed's model / optimizer /
scheduler shards, the loop's own state (step, data cursor, LR scale, rollbacks, loss history) and each
rank's RNG. Every rank writes its shards into its own temporary folder and hands it to
`ray.train.report`, which merges the ranks' files into one checkpoint folder in the run's storage.

Checkpoint folder layout:
    ds/                       DeepSpeed's files (model states, zero_pp_rank_*_optim_states.pt), tag "ds"
    latest                    DeepSpeed's pointer to the tag
    rayllm_state.json         TrainState (rank 0)
    rng_rank{r}.pt            RNG states of rank r
    hf/                       config.json + tokenizer (rank 0), so `export.checkpoint_to_hf` needs nothing else
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

TAG = "ds"
STATE_FILE = "rayllm_state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    cursor: int = 0  # global batches consumed; differs from step once a rollback skipped data
    lr_scale: float = 1.0  # product of the rollbacks' LR factors (already inside the scheduler's state)
    rollbacks: int = 0
    history: list[float] = field(default_factory=list)  # recent good losses, for the spike test
    tokens_seen: int = 0


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, state: TrainState, rank: int, hf_files=None, exclude_frozen: bool = False) -> Path:
    """Write this rank's part of a checkpoint into a fresh temporary folder (collective: all ranks call)."""
    import torch

    folder = Path(tempfile.mkdtemp(prefix="rayllm-ckpt-"))
    engine.save_checkpoint(str(folder), tag=TAG, exclude_frozen_parameters=exclude_frozen)
    torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        if hf_files is not None:
            hf_files(folder / "hf")
    return folder


def report(metrics: dict, folder: Path, step: int) -> None:
    """Hand this rank's folder to Ray Train (collective); Ray deletes the temporary folder after upload."""
    import ray.train

    ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
        checkpoint_dir_name=f"checkpoint_{step:07d}", delete_local_checkpoint_after_upload=True,
    )


def restore(engine, checkpoint, rank: int, strict: bool = True) -> TrainState:
    """Load a reported checkpoint into the engine (collective) and return the loop state it holds."""
    import torch

    with checkpoint.as_directory() as d:
        d = Path(d)
        path, _ = engine.load_checkpoint(str(d), tag=TAG, load_module_strict=strict,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {d}/{TAG}")
        state = TrainState(**json.loads((d / STATE_FILE).read_text()))
        rng = d / f"rng_rank{rank}.pt"
        if not rng.exists():
            raise RuntimeError(f"{rng} missing: a run resumes only with the num_workers it was saved with")
        _set_rng_state(torch.load(rng, weights_only=False))
    return state
