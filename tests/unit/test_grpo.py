"""GRPO without Ray: rewards (a raising user reward is counted, never fatal), advantages and the loss
against TRL's GRPOTrainer formulas, prompt extraction from packed sft rows, micro-batch layout, and
the config rules."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayllm.config import ConfigError, parse_config
from rayllm.config.train import RewardConfig
from rayllm.train.grpo_loss import group_advantages, token_logps, token_loss
from rayllm.train.rewards import Scorer, exact_match, normalise


def shouting(prompt, completion, row):
    return float(completion.isupper())


def broken(prompt, completion, row):
    if "boom" in completion:
        raise KeyError("no such field")
    return 0.5


def not_a_number(prompt, completion, row):
    return float("nan")


def test_builtin_rewards():
    assert normalise("  = 12.  ") == "= 12" and normalise('"Paris"') == "paris"
    assert exact_match("q", " = 12. ", {"answer": "= 12"}) == 1.0
    assert exact_match("q", "= 13", {"answer": "= 12"}) == 0.0
    scorer = Scorer([RewardConfig(kind="regex", pattern=r"^= \d+$"),
                     RewardConfig(kind="length_penalty", target_tokens=2, weight=2.0)], max_new_tokens=10)
    s = scorer.score(["q", "q"], ["= 5", "five"], [{"completion_tokens": 2}, {"completion_tokens": 7}])
    assert s.per_reward == {"regex": [1.0, 0.0], "length_penalty": [0.0, -0.5]}
    assert s.total == [1.0, -1.0] and s.errors == {}


def test_user_reward_by_import_path_and_a_raising_one_is_counted():
    scorer = Scorer([RewardConfig(kind="function", function="tests.unit.test_grpo:shouting", weight=2.0),
                     RewardConfig(kind="function", function="tests.unit.test_grpo:broken"),
                     RewardConfig(kind="function", function="tests.unit.test_grpo:not_a_number", name="nan")], max_new_tokens=8)
    s = scorer.score(["p"] * 3, ["YES", "boom", "no"], [{"answer": "x", "completion_tokens": 1}] * 3)
    assert s.per_reward["shouting"] == [1.0, 0.0, 0.0]
    assert s.per_reward["broken"] == [0.5, 0.0, 0.5]  # the failure scores 0
    assert s.errors == {"broken": 1, "nan": 3}
    assert "KeyError" in s.last_error["broken"] and "nan" in s.last_error["nan"]
    assert s.total == [2.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="no callable"):
        Scorer([RewardConfig(kind="function", function="tests.unit.test_grpo:missing")], 8)


def _trl_advantages(rewards, g):
    # GRPOTrainer._generate_and_score_completions, scale_rewards="group" (trl 1.16)
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    return (rewards - mean) / (std + 1e-4)


def test_advantages_equal_trl():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0])
    ours = group_advantages(rewards, 4)
    assert torch.allclose(ours, _trl_advantages(rewards, 4), atol=1e-6)
    assert torch.all(ours[4:8] == 0)  # equal rewards: nothing to learn from that group


def _trl_loss(logps, old, ref, adv, mask, eps, beta):
    # GRPOTrainer._compute_loss, token-level importance sampling, loss_type "dapo" on one process (trl 1.16)
    advantages = adv.unsqueeze(1)
    coef_1 = torch.exp(logps - old)
    per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    region = ((coef_1 < 1 - eps) & (advantages < 0)) | ((coef_1 > 1 + eps) & (advantages > 0))
    return loss, (region.float() * mask).sum() / mask.sum(), (per_token_kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trl(beta):
    gen = torch.Generator().manual_seed(0)
    logps = (torch.randn(6, 9, generator=gen) * 0.5 - 2).requires_grad_()
    old = logps.detach() + torch.randn(6, 9, generator=gen) * 0.3
    ref = logps.detach() + torch.randn(6, 9, generator=gen) * 0.2
    adv = torch.randn(6, generator=gen)
    mask = (torch.rand(6, 9, generator=gen) > 0.3).float()
    loss, kl, clipped = token_loss(logps, old, adv, 0.2, beta, ref if beta else None)
    ours = (loss * mask).sum() / mask.sum()
    theirs, region, trl_kl = _trl_loss(logps, old, ref, adv, mask, 0.2, beta)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert 0 < ((clipped.float() * mask).sum() / mask.sum()).item() == pytest.approx(region.item())
    if beta:
        assert ((kl * mask).sum() / mask.sum()).item() == pytest.approx(trl_kl.item())
    g_ours = torch.autograd.grad(ours, logps)[0]
    g_theirs = torch.autograd.grad(_trl_loss(logps, old, ref, adv, mask, 0.2, beta)[0], logps)[0]
    assert torch.allclose(g_ours, g_theirs, atol=1e-7)


def test_on_policy_first_pass_is_the_policy_gradient():
    """With old = current (updates_per_batch 1) the ratio is 1: the loss is -A per token, nothing clipped."""
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    loss, kl, clipped = token_loss(logps, logps.detach(), torch.tensor([1.0, -2.0]), 0.2)
    assert kl is None and not clipped.any()
    assert torch.allclose(loss, torch.tensor([[-1.0] * 3, [2.0] * 3]))


def test_token_logps_shift():
    logits = torch.randn(1, 4, 7)
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = [torch.log_softmax(logits[0, t], -1)[ids[0, t + 1]].item() for t in range(3)]
    assert token_logps(logits, ids)[0].tolist() == pytest.approx(expected)


def _sum_tokenizer(tmp_path):
    from rayllm.data.verifiable import problems
    from tests.ray.train_fixtures import train_tokenizer

    records = problems(40, seed=0, high=12)
    texts = [" ".join(m["content"] for m in r["messages"]) for r in records]
    return records, train_tokenizer(texts, tmp_path / "tok", vocab_size=300)


def test_prompts_of_a_packed_sft_split(tmp_path):
    from rayllm.chat import render_chat
    from rayllm.data.pack import pack
    from rayllm.data.verifiable import follows_rule
    from rayllm.train.data import PackedSplit
    from rayllm.train.rollout import prompts_of

    records, tok = _sum_tokenizer(tmp_path)
    docs, labels = [], []
    for r in records:
        chat = render_chat(tok, r["messages"])
        docs.append(np.array(chat.input_ids))
        labels.append(np.array(chat.labels()))
    packed = pack(docs, seq_len=128, pad_id=tok.pad_token_id, labels=labels)  # some documents cut across rows
    split = PackedSplit(packed.input_ids, packed.labels, packed.doc_ids)
    prompts = prompts_of(split, tok)
    assert 25 <= len(prompts) < len(records)  # the cut ones are skipped
    generation_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for ids, text, answer in zip(prompts.prompt_ids, prompts.texts, prompts.answers):
        assert ids[-len(generation_prompt):] == generation_prompt
        assert follows_rule(text, answer), (text, answer)


def test_micro_batch_layout():
    from rayllm.train.grpo import Grpo

    batch = {"prompt_ids": [[5, 6, 7], [5, 6], [9], [9]],
             "completions": [{"ids": [1, 2], "vllm_logps": [-0.1, -0.2]}, {"ids": [3], "vllm_logps": [-0.3]},
                             {"ids": [4, 4, 4], "vllm_logps": [-1, -1, -1]}, {"ids": [8], "vllm_logps": [-2]}],
             "advantages": [1.0, -1.0, 0.5, -0.5], "versions": [3, 3, 3, 3]}
    fake = SimpleNamespace(pad_id=0)
    rank1 = Grpo.micro_batches(fake, batch, rank=1, micro=1, accum=2, device="cpu")
    assert [mb["input_ids"].tolist() for mb in rank1] == [[[9, 4, 4, 4]], [[9, 8]]]
    assert rank1[0]["mask"].tolist() == [[1, 1, 1]] and rank1[1]["mask"].tolist() == [[1]]
    rank0 = Grpo.micro_batches(fake, batch, rank=0, micro=2, accum=1, device="cpu")[0]
    assert rank0["input_ids"].tolist() == [[5, 6, 7, 1, 2], [5, 6, 3, 0, 0]]
    assert rank0["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # logps position t scores token t+1: the completion's tokens sit at positions len(prompt)-1 on
    assert rank0["mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert rank0["vllm_logps"][0, 2:].tolist() == pytest.approx([-0.1, -0.2])
    assert rank0["advantages"].tolist() == [1.0, -1.0]


def _grpo(**train):
    grpo = {"rewards": [{"kind": "exact_match"}], **train.pop("grpo", {})}
    return {"train": {"dataset": "d", "objective": "grpo", "grpo": grpo, **train}}


def test_config_rules():
    with pytest.raises(ConfigError, match="objective grpo needs grpo.rewards"):
        parse_config({"train": {"dataset": "d", "objective": "grpo"}})
    with pytest.raises(ConfigError, match="grpo: settings are for objective grpo"):
        parse_config({"train": {"dataset": "d", "grpo": {"group_size": 8}}})
    with pytest.raises(ConfigError, match="not a multiple of grpo.group_size"):
        parse_config(_grpo(micro_batch_size=3, num_workers=2, grpo={"group_size": 4}))
    with pytest.raises(ConfigError, match="cosine schedule over max_steps would end early"):
        parse_config(_grpo(grpo={"updates_per_batch": 2}))
    assert parse_config(_grpo(grpo={"updates_per_batch": 2}, lr_scheduler_type="constant")).train.grpo.updates_per_batch == 2
    with pytest.raises(ConfigError, match="kind regex needs a pattern"):
        parse_config(_grpo(grpo={"rewards": [{"kind": "regex"}]}))
    with pytest.raises(ConfigError, match="not a regular expression"):
        parse_config(_grpo(grpo={"rewards": [{"kind": "regex", "pattern": "("}]}))
    with pytest.raises(ConfigError, match="reward names must differ"):
        parse_config(_grpo(grpo={"rewards": [{"kind": "exact_match"}, {"kind": "exact_match"}]}))
    with pytest.raises(ConfigError, match="function"):
        parse_config(_grpo(grpo={"rewards": [{"kind": "function", "function": "not a path"}]}))
    cfg = parse_config(_grpo(grpo={"rewards": [{"kind": "function", "function": "pkg.mod:fn"}, {"kind": "exact_match", "weight": 0.5}]}))
    assert [r.label for r in cfg.train.grpo.rewards] == ["fn", "exact_match"]


def test_preflight_rules():
    from rayllm.train.grpo import preflight_problems

    cfg = parse_config({"model": {"hidden_size": 64}, **_grpo()})
    problems = preflight_problems(cfg, {"mode": "preference"})
    assert len(problems) == 2
    assert "data.mode: sft" in problems[0] and "model.path" in problems[1]
    # a full fine-tune: weights to the engines from rank 0, so not sharded by ZeRO-3, and no reference model for a KL term
    full = _grpo(grpo={"beta": 0.04})
    full["train"]["zero_stage"] = 3
    problems = preflight_problems(parse_config({"model": {"path": "base"}, **full}), {"mode": "sft"})
    assert len(problems) == 2 and "zero_stage to 2" in problems[0] and "beta: 0" in problems[1]
    assert preflight_problems(parse_config({"model": {"path": "base"}, **_grpo()}), {"mode": "sft"}) == []
    ok = parse_config({"model": {"path": "base", "lora": {"rank": 4}}, **_grpo()})
    assert preflight_problems(ok, {"mode": "sft"}) == []
    assert preflight_problems(parse_config({"model": {"hidden_size": 64}, "train": {"dataset": "d"}}), {"mode": "pretrain"}) == []


def test_rule_reward_shipped_task():
    from rayllm.data.verifiable import problems, rule_reward

    (r,) = problems(1, seed=3, high=10)
    question, answer = r["messages"][1]["content"], r["messages"][2]["content"]
    assert rule_reward(question, answer, {}) == 1.0 and rule_reward(question, answer + "!", {}) == 0.0
    assert math.isclose(exact_match(question, answer.upper(), {"answer": answer}), 1.0)
