import csv

import pytest

from rayllm.config import parse_config
from rayllm.tune.report import TrialRow, best_trial, table, write_csv
from rayllm.tune.space import check_sweep, fingerprint, grid_size, metric_mode, param_space, trial_config

BASE = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "lora": {"rank": 4}},
    "train": {"dataset": "d", "max_steps": 20},
    "tune": {"learning_rate": {"type": "grid", "values": [1e-4, 1e-3]}, "grace_period": 5, "lora_rank": [4, 8]},
}


def test_trial_config_sets_the_trial_values_and_its_own_run_folder():
    cfg = trial_config(BASE, {"learning_rate": 3e-4, "lora_rank": 8, "warmup_steps": 2}, "abc_00001", "/sweeps/s/trials", "s")
    parsed = parse_config(cfg)
    assert parsed.train.learning_rate == 3e-4 and parsed.train.warmup_steps == 2
    assert parsed.model.lora.rank == 8 and parsed.model.lora.alpha == 16.0  # other LoRA keys kept
    assert parsed.train.run_name == "abc_00001" and parsed.train.output_dir == "/sweeps/s/trials"
    assert parsed.train.wandb_group == "s"
    assert BASE["train"]["max_steps"] == 20 and "run_name" not in BASE["train"]  # the base is not mutated


def test_param_space_holds_only_the_searched_values():
    space = param_space(parse_config(BASE).tune)
    assert set(space) == {"learning_rate", "lora_rank"}  # the base config reaches trials another way
    assert space["learning_rate"] == {"grid_search": [1e-4, 1e-3]}


def test_grid_size_counts_every_trial():
    assert grid_size(parse_config(BASE).tune) == 4
    assert grid_size(parse_config({**BASE, "tune": {**BASE["tune"], "warmup_steps": [0, 2, 4], "num_samples": 2}}).tune) == 24
    loguniform = {"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3}, "num_samples": 5}
    assert grid_size(parse_config({**BASE, "tune": loguniform}).tune) == 5


def test_fingerprint_changes_with_what_trials_train_not_with_publishing():
    cfg = parse_config(BASE)
    publish = parse_config({**BASE, "tune": {**BASE["tune"], "publish_as": "x", "promote_alias": "prod", "output_dir": "/else"}})
    assert fingerprint(publish) == fingerprint(cfg)
    other_lr = parse_config({**BASE, "tune": {**BASE["tune"], "learning_rate": {"type": "grid", "values": [1e-4]}}})
    other_steps = parse_config({**BASE, "train": {**BASE["train"], "max_steps": 30}})
    assert len({fingerprint(cfg), fingerprint(other_lr), fingerprint(other_steps)}) == 3


def test_check_sweep_finds_unusable_combinations():
    bad = parse_config({**BASE, "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
                        "tune": {**BASE["tune"], "grace_period": 50, "publish_as": "support", "promote_alias": None}})
    problems = check_sweep(bad)
    assert any(p.startswith("tune.lora_rank") for p in problems)
    assert any(p.startswith("tune.publish_as") for p in problems)
    assert any("grace_period (50) exceeds train.max_steps (20)" in p for p in problems)
    assert check_sweep(parse_config(BASE)) == []
    alias_only = parse_config({**BASE, "tune": {**BASE["tune"], "promote_alias": "prod"}})
    assert any(p.startswith("tune.promote_alias") for p in check_sweep(alias_only))


def test_dpo_beta_is_swept_beside_the_learning_rate():
    dpo = {**BASE, "train": {**BASE["train"], "objective": "dpo", "dpo": {"loss_type": "ipo"}},
           "tune": {**BASE["tune"], "lora_rank": [], "dpo_beta": [0.05, 0.1, 0.5], "metric": "val_rewards/accuracies"}}
    cfg = parse_config(dpo)
    assert param_space(cfg.tune)["dpo_beta"] == {"grid_search": [0.05, 0.1, 0.5]} and grid_size(cfg.tune) == 6
    trial = parse_config(trial_config(dpo, {"learning_rate": 1e-3, "dpo_beta": 0.5}, "t", "/s", "s"))
    assert trial.train.dpo.beta == 0.5 and trial.train.dpo.loss_type == "ipo"  # the other DPO keys kept
    assert check_sweep(cfg) == []
    lm = parse_config({**BASE, "tune": {**BASE["tune"], "dpo_beta": [0.1]}})
    assert any(p.startswith("tune.dpo_beta") for p in check_sweep(lm))
    # DPO losses under different betas do not compare: a beta sweep must rank by accuracy or margin
    by_loss = parse_config({**dpo, "tune": {**dpo["tune"], "metric": "val_loss"}})
    assert any(p.startswith("tune.metric: DPO losses under different betas") for p in check_sweep(by_loss))
    lm_acc = parse_config({**BASE, "tune": {**BASE["tune"], "metric": "val_rewards/margins"}})
    assert any(p.startswith("tune.metric: val_rewards/margins is a DPO figure") for p in check_sweep(lm_acc))


def test_a_dpo_sweep_ranks_by_the_highest_accuracy():
    rows = [row("a", 1e-4, 0.60), row("b", 1e-3, 0.70), row("c", 1e-2, 0.65)]
    for r, acc in zip(rows, (0.95, 0.80, 0.99)):
        r.score = acc
    rows[2].status = "stopped"  # stopped trials have no adapter: never the best
    best = best_trial(rows, metric_mode("val_rewards/accuracies"))
    assert best.trial == "a"
    assert "best: a (lr 0.0001, val loss 0.6000, val_rewards/accuracies 0.9500)" in table(rows, best, "val_rewards/accuracies")
    assert metric_mode("val_loss") == "min" and metric_mode("val_rewards/margins") == "max"


def test_grid_space_requires_values():
    from rayllm.config import ConfigError

    with pytest.raises(ConfigError, match="grid needs values"):
        parse_config({"tune": {"learning_rate": {"type": "grid", "values": []}}})
    with pytest.raises(ConfigError, match="loguniform needs low < high"):
        parse_config({"tune": {"learning_rate": {"type": "loguniform", "low": 1e-3, "high": 1e-4}}})


def row(name, lr, best, status="finished", steps=20):
    return TrialRow(name, lr, None, None, best, best, 2.0, steps, steps * 100, 1.0, steps < 20, status,
                    curve=[(10, best + 0.5), (20, best)] if best is not None else [])


def test_best_trial_is_the_lowest_val_loss_among_finished(tmp_path):
    rows = [row("a", 1e-4, 3.0), row("b", 1e-3, 2.0), row("c", 1e-2, 1.0, status="stopped", steps=10), row("d", 3e-3, None)]
    best = best_trial(rows)
    assert best.trial == "b"
    text = table(rows, best)
    assert "b *" in text and "best: b" in text
    write_csv(rows, tmp_path / "r.csv")
    read = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["trial"] for r in read] == ["a", "b", "c", "d"]
    assert read[2]["stopped_early"] == "True" and read[1]["stopped_early"] == "False"
    assert best_trial([row("x", 1e-3, 1.0, status="stopped", steps=5)]) is None


def test_a_rerun_with_other_settings_is_refused_before_ray_starts(tmp_path):
    from rayllm.config import ConfigError
    from rayllm.tune.sweep import _check_same_sweep

    cfg = parse_config(BASE)
    _check_same_sweep(cfg, tmp_path, resuming=False)  # a new sweep records its fingerprint
    _check_same_sweep(parse_config({**BASE, "tune": {**BASE["tune"], "publish_as": "x"}}), tmp_path, resuming=True)
    other = parse_config({**BASE, "train": {**BASE["train"], "max_steps": 30}})
    with pytest.raises(ConfigError, match="tune.name: .* other model/train/tune settings"):
        _check_same_sweep(other, tmp_path, resuming=True)


def test_results_table_and_csv_carry_each_trials_eval_figures(tmp_path):
    def row(trial, ppl, ev):
        return TrialRow(trial, 1e-3, None, None, 1.0, 1.0, ppl, 10, 100, 1.0, False, "finished", eval=ev)

    rows = [row("t1", 2.7, {"ppl": 2.71, "qa_bleu": 12.5}), row("t2", 3.0, {}), row("t3", 3.1, {"ppl": 3.1})]
    write_csv(rows, tmp_path / "results.csv")
    read = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert list(read[0])[-2:] == ["eval_ppl", "eval_qa_bleu"]
    assert read[0]["eval_ppl"] == "2.71" and read[0]["eval_qa_bleu"] == "12.5" and read[1]["eval_ppl"] == ""
    printed = table(rows, rows[0])
    assert "eval_qa_bleu" in printed.splitlines()[0] and "12.5" in printed


def test_sweep_evaluate_needs_an_eval_section(tmp_path):
    from rayllm.config import ConfigError
    from rayllm.tune import sweep

    cfg = parse_config({**BASE, "tune": {**BASE["tune"], "evaluate": True}})
    with pytest.raises(ConfigError, match="tune.evaluate: true needs an eval: section"):
        sweep.run(cfg)


def test_asha_never_decides_at_a_trials_last_step():
    import numpy as np

    from rayllm.tune.sweep import asha_bounds

    for grace, steps, rf in [(3, 12, 2), (6, 24, 2), (2, 4, 2), (1, 9, 3), (10, 10, 2), (120, 120, 2), (50, 20, 2)]:
        b = asha_bounds(grace, steps)
        rungs = [b["grace_period"] * rf ** k for k in range(int(np.log(b["max_t"] / b["grace_period"]) / np.log(rf) + 1))]
        assert all(r < steps for r in rungs) or all(r > steps for r in rungs), (grace, steps, rungs)
        assert (grace >= steps) == all(r > steps for r in rungs)  # early stopping only when the grace period allows it
