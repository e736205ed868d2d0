"""A full fine-tune's weights from training rank 0 into the rollout engines over a torch.distributed
group of their own (`train.grpo.rollout.weight_sync: collective`), as OpenRLHF and TRL's server mode
do: NCCL where the engines hold GPUs, gloo on CPU. Rank 0 of the group is training rank 0, rank k
the k-th rollout actor; the group is separate from the trainers' own (its own TCPStore), so the
training ranks' collectives are untouched. Tensors go one by one in the order of a list of
(name, shape, dtype) every member receives first; each engine then loads them as it loads weights
from the object store (`rayllm.vllm_offline.load_weights`).

torch.distributed is used directly (`ProcessGroupGloo`/`ProcessGroupNCCL` on a `TCPStore`) rather
than Ray's `ray.util.collective`, whose NCCL backend needs cupy (not part of a torch + vLLM install);
torch's own groups need nothing else, and the CPU path the tests run is the same code as the GPU one
with another backend."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

TIMEOUT_S = 600  # a member that never joins or never receives: the group's calls fail instead of hanging


class Member:
    """This process's member of a weight group: the process group and the store it met on (rank 0
    serves the store, which must live as long as the group)."""

    def __init__(self, host: str, port: int, rank: int, world: int, backend: str):
        import torch.distributed as dist

        timeout = timedelta(seconds=TIMEOUT_S)
        self.store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(self.store, rank, world)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world, timeout)


def describe(weights: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """What the receivers allocate: (name, shape, dtype name) of each tensor, in sending order."""
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in weights.items()]


def _broadcast(member: Member, tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    member.group.broadcast([tensor], opts).wait()


def send(member: Member, weights: dict[str, Any]) -> None:
    """Rank 0: every tensor to the group, in `describe` order."""
    for t in weights.values():
        _broadcast(member, t.detach().contiguous())


def receive(member: Member, layout: list, device: str) -> dict[str, Any]:
    """An engine: the tensors rank 0 sends, allocated from `layout` on `device`."""
    import torch

    out = {}
    for name, shape, dtype in layout:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        _broadcast(member, t)
        out[name] = t
    return out
