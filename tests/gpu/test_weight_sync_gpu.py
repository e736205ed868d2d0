"""GPU path of GRPO's full fine-tune weight sync: the NCCL broadcast from this process (as training
rank 0, its model on a GPU) into a rollout actor's vLLM engine on another GPU. Needs two GPUs (NCCL
refuses two members on one); the same code with gloo runs on CPU in tests/ray/test_train_grpo.py."""

from types import SimpleNamespace

import pytest
import torch

from tests.ray.test_train_grpo import tiny_task

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_broadcast_reaches_the_engine_on_another_gpu(ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    from rayllm.config.train import RolloutConfig
    from rayllm.train.grpo import CHECKSUM_PARAM, full_weights
    from rayllm.train.rollout import RolloutPool

    base, _ = tiny_task(tmp_path)
    device = f"cuda:{torch.cuda.device_count() - 1}"  # Ray gives the actor the first free GPU, GPU 0
    torch.cuda.set_device(device)
    model = AutoModelForCausalLM.from_pretrained(base).to(device)
    pool = RolloutPool(str(base), RolloutConfig(num_actors=1, actor_cpus=1, actor_gpus=1, max_model_len=128, dtype="float32"), 0, seed=0)
    try:
        assert pool.weight_sync == "collective" and pool.backend == "nccl"
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        sync = pool.load_weights(full_weights(SimpleNamespace(module=model), to_cpu=False), 1, [CHECKSUM_PARAM])
        greedy = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "stop_token_ids": [], "ignore_eos": True}
        after = pool.generate([[5, 6, 7, 8]], {"name": None, "id": None, "path": None, "version": 1}, greedy, 1)
    finally:
        pool.close()
    (sums,) = sync["engine_checksums"]
    assert sums[CHECKSUM_PARAM] == pytest.approx(float(model.state_dict()[CHECKSUM_PARAM].double().sum()), rel=1e-5)
    ids = [5, 6, 7, 8]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    assert after["group_versions"] == [1] and after["groups"][0][0]["ids"] == ids[4:]
