"""DPO without Ray: the loss, rewards and margins against TRL's DPOTrainer (the same model and batch
through both), the batch a preference row becomes, and the config refusals made before Ray starts."""

import json
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayllm.config import ConfigError, ModelConfig, parse_config
from rayllm.config.train import DpoConfig
from rayllm.data.pack import IGNORE_INDEX
from rayllm.data.preference import pair_rows, render_pair
from rayllm.model import build_model
from rayllm.train.data import PackedSplit
from rayllm.train.dpo import Dpo, PreferenceSplit, Stats, dpo_loss, sequence_logps
from tests.ray.train_fixtures import corpus, make_dataset, tiny_config, train_tokenizer

PAIRS = [
    {"prompt": [{"role": "user", "content": "the cat sees?"}], "chosen": [{"role": "assistant", "content": "a red ball."}],
     "rejected": [{"role": "assistant", "content": "the blue house, three apples."}]},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog likes?"}],
     "chosen": [{"role": "assistant", "content": "the small boat."}], "rejected": [{"role": "assistant", "content": "a letter."}]},
    {"prompt": [{"role": "user", "content": "my sister paints?"}, {"role": "assistant", "content": "the green door."},
                {"role": "user", "content": "and then?"}],
     "chosen": [{"role": "assistant", "content": "a long letter."}], "rejected": [{"role": "assistant", "content": "nothing"}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(corpus(60) + ["be brief and then nothing"], folder)
    rendered = [render_pair(tok, p) for p in PAIRS]
    batch = {"ids": [np.array(c + r, dtype=np.int32) for c, _, r, _ in rendered],
             "labels": [np.array(cl + rl, dtype=np.int32) for _, cl, _, rl in rendered],
             "docs": [np.repeat(np.array([0, 1], dtype=np.int32), [len(c), len(r)]) for c, _, r, _ in rendered]}
    table = pair_rows(batch, seq_len=96, pad_id=tok.pad_token_id)
    rows = PackedSplit.from_table(table, 96, "pairs")
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2), tok, seed=0).eval()
    return tok, rows, model, rendered


def test_a_pair_row_becomes_chosen_then_rejected_sequences(setup):
    tok, rows, _, rendered = setup
    split = PreferenceSplit(rows, tok.pad_token_id)
    b = split.batch(np.arange(3))
    assert b["input_ids"].shape[0] == 6 and split.target_tokens(np.arange(3)) == 3
    for i, (c_ids, c_lab, r_ids, r_lab) in enumerate(rendered):
        for k, (ids, lab) in ((i, (c_ids, c_lab)), (i + 3, (r_ids, r_lab))):
            n = len(ids)
            assert b["input_ids"][k, :n].tolist() == ids and b["labels"][k, :n].tolist() == lab
            assert b["attention_mask"][k].sum() == n and (b["labels"][k, n:] == IGNORE_INDEX).all()
    # labels cover the response and its end token only, never the prompt (not even its earlier assistant turn)
    c_ids, c_lab, _, _ = rendered[2]
    trained = tok.decode([t for t in c_lab if t != IGNORE_INDEX])
    assert trained.startswith("a long letter.") and "green door" not in trained and "<|im_end|>" in trained


def _trl_trainer_stub(model, beta: float, loss_type: str, label_smoothing: float = 0.0):
    """What DPOTrainer._compute_loss reads from `self`, as DPOTrainer.__init__ would set it on one process."""
    def gather(t):
        return t

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=gather, gather_for_metrics=gather)
    return SimpleNamespace(model=model, accelerator=accelerator, beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                           label_smoothing=label_smoothing, f_divergence_type="reverse_kl", ld_alpha=None,
                           precompute_ref_logps=True, use_weighting=False, aux_loss_enabled=False, _tp_size=1,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0)


def _trl_inputs(batch: dict, ref: torch.Tensor) -> dict:
    n = len(ref) // 2
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
            "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_loss_rewards_and_margins_equal_trls(setup, loss_type, beta):
    """Same tiny model, same rows, same reference log-probs: TRL's DPOTrainer._compute_loss (fused LM
    head, its own log-prob gathering) and rayllm's Dpo objective agree within 1e-5 in fp32."""
    trl = pytest.importorskip("trl", reason="trl (the dev extra) is the reference for the DPO figures")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    tok, rows, model, _ = setup
    split = PreferenceSplit(rows, tok.pad_token_id)
    batch = split.batch(np.arange(3))
    ref = torch.tensor([-30.0, -12.5, -21.0, -28.0, -9.0, -18.5])  # chosen ×3, rejected ×3

    ours = Dpo(DpoConfig(beta=beta, loss_type=loss_type), lora=False)
    split.ref_logps = torch.stack(ref.chunk(2), dim=1).double().numpy()
    with torch.no_grad():
        losses, chosen, rejected = ours.terms(model, split.batch(np.arange(3)), "cpu")
    stats = Stats()
    stats.add(losses, chosen, rejected)
    figures = dict(zip(("pairs", "loss", "chosen", "rejected", "margins", "accuracies"), stats.sums / 3))

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    stub = _trl_trainer_stub(model, beta, loss_type)
    with torch.no_grad():
        trl_loss = DPOTrainer._compute_loss(stub, model, _trl_inputs(batch, ref), return_outputs=False)
    m = {k: v[0] for k, v in stub._metrics["eval"].items()}
    assert trl.__version__ and abs(trl_loss.item() - losses.mean().item()) < 1e-5
    assert abs(m["rewards/chosen"] - figures["chosen"]) < 1e-5 and abs(m["rewards/rejected"] - figures["rejected"]) < 1e-5
    assert abs(m["rewards/margins"] - figures["margins"]) < 1e-5 and abs(m["rewards/accuracies"] - figures["accuracies"]) < 1e-6
    logps, _ = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert abs(m["logps/chosen"] - logps[:3].mean().item()) < 1e-4 and abs(m["logps/rejected"] - logps[3:].mean().item()) < 1e-4


def test_conservative_dpo_equals_trls_smoothed_sigmoid():
    """cDPO's label smoothing: TRL 1.16 keeps the smoothed sigmoid in its `aot` loss, which on a
    single pair (nothing to sort) is exactly conservative DPO; compared pair by pair."""
    pytest.importorskip("trl", reason="trl (the dev extra) is the reference for the DPO figures")
    from trl.trainer.dpo_trainer import DPOTrainer

    torch.manual_seed(0)
    policy, ref = torch.randn(2, 5) * 5 - 20, torch.randn(2, 5) * 5 - 20
    ours, _, _ = dpo_loss(policy[0], policy[1], ref[0], ref[1], beta=0.2, label_smoothing=0.15)
    for i in range(5):
        model = _FixedLogps(torch.stack([policy[0, i], policy[1, i]]))
        stub = _trl_trainer_stub(model, 0.2, "aot", label_smoothing=0.15)
        inputs = {"input_ids": torch.ones(2, 2, dtype=torch.long), "attention_mask": torch.ones(2, 2, dtype=torch.long),
                  "completion_mask": torch.tensor([[0, 1], [0, 1]]), "ref_chosen_logps": ref[0, i:i + 1], "ref_rejected_logps": ref[1, i:i + 1]}
        assert abs(DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False).item() - ours[i].item()) < 1e-5


class _FixedLogps(torch.nn.Module):
    """A stand-in for a model patched with TRL's fused LM head: each sequence's one completion token
    has the given log-prob."""

    def __init__(self, logps):
        super().__init__()
        self.logps = logps

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=False):
        n = len(self.logps)
        zeros = torch.zeros(n, 1)
        return SimpleNamespace(log_probs=self.logps.view(n, 1), entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def test_loss_formulas_at_the_reference_and_with_smoothing():
    zero = torch.zeros(4)
    losses, c, r = dpo_loss(zero - 5, zero - 7, zero - 5, zero - 7, beta=0.1)
    assert torch.allclose(losses, torch.full((4,), np.log(2.0), dtype=torch.float32)) and not c.any() and not r.any()
    ipo, _, _ = dpo_loss(zero, zero, zero, zero, beta=0.1, loss_type="ipo", chosen_tokens=zero + 3, rejected_tokens=zero + 2)
    assert torch.allclose(ipo, torch.full((4,), 25.0))  # (0 - 1/(2β))²
    smooth, _, _ = dpo_loss(zero + 1, zero, zero, zero, beta=1.0, label_smoothing=0.5)
    assert torch.allclose(smooth, torch.full((4,), 0.5 * (np.log1p(np.exp(-1)) + np.log1p(np.exp(1))), dtype=torch.float32))


def test_spike_floor_is_the_loss_at_the_reference():
    assert abs(Dpo(DpoConfig(), lora=True).spike_floor - np.log(2.0)) < 1e-12
    assert Dpo(DpoConfig(loss_type="ipo", beta=0.1), lora=True).spike_floor == pytest.approx(25.0)


def test_config_refusals_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing"):
        parse_config({"train": {"dataset": "d", "objective": "dpo", "dpo": {"loss_type": "ipo", "label_smoothing": 0.1}}})
    with pytest.raises(ConfigError, match="train.dpo.beta"):
        parse_config({"train": {"dataset": "d", "dpo": {"beta": 0}}})
    with pytest.raises(ConfigError, match="data.mode"):
        parse_config({"data": {"inputs": ["x"], "output_dir": "y", "mode": "pairs"}})


def _preference_dataset(tmp_path, tok_dir):
    """A prepared preference dataset in `prepare`'s layout (3 pairs per split), written without Ray."""
    from rayllm.data.tokenizer import load_tokenizer
    import pyarrow.parquet as pq

    tok = load_tokenizer(tok_dir)
    out = tmp_path / "pref"
    tok.save_pretrained(out / "tokenizer")
    splits = {}
    for split in ("train", "val"):
        rendered = [render_pair(tok, p) for p in PAIRS] * 4
        batch = {"ids": [np.array(c + r) for c, _, r, _ in rendered], "labels": [np.array(cl + rl) for _, cl, _, rl in rendered],
                 "docs": [np.repeat(np.array([0, 1]), [len(c), len(r)]) for c, _, r, _ in rendered]}
        (out / split).mkdir(parents=True)
        pq.write_table(pair_rows(batch, 160, tok.pad_token_id), out / split / "part-00000.parquet")
        splits[split] = {"path": split, "sequences": 12, "tokens": 0, "documents": 24, "pad_tokens": 0}
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1, "mode": "preference", "seq_len": 160,
                                                   "tokenizer": "tokenizer", "splits": splits, "pairs": 24}))
    return out


def test_preflight_refuses_mismatched_data_and_objective_and_plans_the_reference(tmp_path):
    from rayllm.train.preflight import preflight

    sft = make_dataset(tmp_path / "sft", seq_len=64, n_docs=40, val_docs=10, mode="sft")
    pref = _preference_dataset(tmp_path, sft / "tokenizer")
    model = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "dtype": "float32", "max_position_embeddings": 256}

    raw = tiny_config(sft, tmp_path, objective="dpo", micro_batch_size=2, model=dict(model))
    with pytest.raises(ConfigError, match=r"train.objective: dpo needs a preference dataset.*data.mode 'sft'"):
        preflight(parse_config(raw))
    raw = tiny_config(pref, tmp_path, micro_batch_size=2, model=dict(model))
    with pytest.raises(ConfigError, match=r"train.objective: 'lm'.*preference dataset.*set train.objective: dpo"):
        preflight(parse_config(raw))

    full = preflight(parse_config(tiny_config(pref, tmp_path, objective="dpo", micro_batch_size=2, model=dict(model))))
    assert full.plan.device["reference"] == 4 * full.shape.total_params, "a full fine-tune holds a frozen fp32 copy"
    pre = preflight(parse_config(tiny_config(pref, tmp_path, objective="dpo", micro_batch_size=2, dpo={"precompute_reference": True},
                                             model=dict(model))))
    lora = preflight(parse_config(tiny_config(pref, tmp_path, objective="dpo", micro_batch_size=2, model={**model, "lora": {"rank": 4}})))
    assert "reference" not in pre.plan.device and "reference" not in lora.plan.device
    sharded = preflight(parse_config(tiny_config(pref, tmp_path, objective="dpo", micro_batch_size=2, zero_stage=3, model=dict(model))))
    assert sharded.plan.device["reference"] == 4 * sharded.shape.total_params / 2


class _Engine:
    """What Dpo reads from DeepSpeed's engine: a callable model and `.module` (the PEFT model)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def test_reference_is_the_disabled_adapter_under_lora_and_the_frozen_copy_otherwise(setup):
    import copy

    from rayllm.config import LoraConfig
    from rayllm.model import apply_lora

    tok, rows, _, _ = setup
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2), tok, seed=0).eval()  # unpatched by TRL
    batch = PreferenceSplit(rows, tok.pad_token_id).batch(np.arange(3))
    with torch.no_grad():
        base_logps, _ = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    peft = apply_lora(copy.deepcopy(model), LoraConfig(rank=4)).eval()
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: the policy differs from the base
    lora = Dpo(DpoConfig(), lora=True)
    with torch.no_grad():
        assert torch.allclose(lora.reference_logps(_Engine(peft), batch), base_logps, atol=1e-5)
        losses, chosen, _ = lora.terms(_Engine(peft), batch, "cpu")
    assert chosen.abs().sum() > 0, "the adapter moves the policy away from its reference"

    full = Dpo(DpoConfig(), lora=False, reference=copy.deepcopy(model))
    with torch.no_grad():
        losses, chosen, rejected = full.terms(_Engine(model), batch, "cpu")
    assert torch.allclose(losses, torch.full_like(losses, np.log(2.0))) and not chosen.any() and not rejected.any()
