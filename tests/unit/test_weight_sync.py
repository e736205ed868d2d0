"""rayllm.train.weight_sync over gloo between this process (rank 0) and two spawned receivers: every
tensor arrives with its name, shape, dtype and values, in the order sent."""

import multiprocessing as mp

import torch

from rayllm.ray_session import free_port
from rayllm.train import weight_sync


def _receiver(port: int, rank: int, layout: list, out) -> None:
    member = weight_sync.Member("127.0.0.1", port, rank, 3, "gloo")
    got = weight_sync.receive(member, layout, "cpu")
    out.put((rank, {name: (t.dtype, t.tolist()) for name, t in got.items()}))


def test_weights_broadcast_to_every_member_as_sent():
    weights = {"model.embed_tokens.weight": torch.randn(5, 3), "model.norm.weight": torch.ones(3, dtype=torch.bfloat16),
               "lm_head.weight": torch.arange(6, dtype=torch.float32).reshape(3, 2).T}  # not contiguous
    layout = weight_sync.describe(weights)
    assert layout[1] == ("model.norm.weight", (3,), "bfloat16")
    port, ctx = free_port(), mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, rank, layout, out)) for rank in (1, 2)]
    for p in procs:
        p.start()
    weight_sync.send(weight_sync.Member("127.0.0.1", port, 0, 3, "gloo"), weights)
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    want = {name: (t.dtype, t.tolist()) for name, t in weights.items()}
    assert results == {1: want, 2: want}
    assert list(results[1]) == list(weights)
