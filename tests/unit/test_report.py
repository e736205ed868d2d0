"""report.html: one self-contained page for a training run, a sweep or an evaluation, built from the
files those stages write; looked at in a real headless Chromium (no Ray)."""

import csv
import json
import re
import shutil
import subprocess

import pytest

from rayllm.cli import main
from rayllm.report import build


def _run_dir(root):
    run = root / "run"
    run.mkdir()
    records = [{"event": "start", "step": 0, "dtype": "float32", "world": 2, "trainable_params": 1000, "total_params": 5000,
                "cpu_capability": "AVX2"}]
    for step in range(1, 13):
        records.append({"step": step, "loss": 6.0 - 0.2 * step, "lr": 1e-3, "tokens_per_s": 900.0 + step, "peak_mem_gib": 0.5})
        if step % 6 == 0:
            records.append({"event": "eval", "step": step, "val_loss": 5.5 - 0.1 * step, "val_ppl": 100.0 / step})
    records.append({"event": "rollback", "step": 9, "restored_step": 6, "reason": "loss is nan"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "result.json").write_text(json.dumps({"status": "finished", "step": 12, "loss": 3.6, "val_loss": 4.3, "val_ppl": 73.7,
                                                 "adapter_dir": str(run / "adapter")}))
    (run / "config.yaml").write_text("train:\n  learning_rate: 0.001\n  note: <b>escaped</b>\n")
    return run


def test_a_run_report_holds_its_figures_curves_and_config_and_needs_no_network(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(["report", str(run)]) == 0 and "report.html" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    assert "Training run run" in page and "73.7" in page and "finished" in page and "loss is nan" in page
    assert page.count("data:image/png;base64,") == 1 and "learning rate" in page
    assert "&lt;b&gt;escaped&lt;/b&gt;" in page, "config text is escaped"
    assert not re.search(r"(src|href)=['\"]?https?:", page) and "<script" not in page


def test_a_sweep_report_tables_the_trials_and_marks_asha_stops(tmp_path):
    sweep = tmp_path / "lr"
    sweep.mkdir()
    rows = [{"trial": "t0", "learning_rate": 1e-6, "status": "finished", "steps": 3, "best_val_loss": 6.1, "stopped_early": True},
            {"trial": "t1", "learning_rate": 3e-3, "status": "finished", "steps": 12, "best_val_loss": 4.2, "stopped_early": False}]
    with open(sweep / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (sweep / "summary.json").write_text(json.dumps({"trials": 2, "stopped_early": 1, "best": "t1", "published": "tiny@v1"}))
    (sweep / "trials" / "t1").mkdir(parents=True)
    (sweep / "trials" / "t1" / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": 6, "val_loss": 4.5}) + "\n"
                                                           + json.dumps({"event": "eval", "step": 12, "val_loss": 4.2}) + "\n")
    page = build(sweep).read_text()
    assert "Sweep lr" in page and "★ t1" in page and "tiny@v1" in page
    assert page.count("class='stopped'") == 1 and page.count("data:image/png;base64,") == 2


def test_an_evaluation_report_puts_targets_side_by_side(tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "eval.json").write_text(json.dumps({"name": "ab", "metrics": {"base": {"perplexity": 80.0, "bleu": 3.1},
                                                                        "tiny@v2": {"perplexity": 40.0, "bleu": 9.5}},
                                              "targets": [{"label": "base", "kind": "folder", "source": "/m"},
                                                          {"label": "tiny@v2", "kind": "registry", "registry_ref": "tiny@v2"}]}))
    page = build(ev).read_text()
    assert "Evaluation ab" in page and "<th>tiny@v2</th>" in page and "9.5" in page and "40" in page


def test_a_folder_with_nothing_to_report_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run" in capsys.readouterr().err and not (tmp_path / "report.html").exists()


@pytest.mark.timeout(120)
def test_the_run_report_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (scripts/setup.sh installs Debian's chromium)")
    page = build(_run_dir(tmp_path))
    shot = tmp_path / "report.png"
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1400"]
    subprocess.run([*args, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=90, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000  # a page with plots, not blank
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90, check=True).stdout
    assert "Training run run" in dom and "val perplexity" in dom


def test_a_grpo_run_report_plots_reward_per_function_kl_clip_fraction_and_length(tmp_path):
    run = tmp_path / "grpo"
    run.mkdir()
    records = [{"event": "eval", "step": 0, "val_reward": 0.1}]
    for step in range(1, 7):
        records.append({"step": step, "loss": 0.01, "lr": 1e-3, "reward_mean": 0.1 * step, "reward/exact_match": 0.05 * step,
                        "reward/format": 0.5, "kl": 0.001 * step, "clip_fraction": 0.02, "completion_length": 12.0})
    records.append({"event": "eval", "step": 6, "val_reward": 0.4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = build(run).read_text()
    assert "<h2>GRPO</h2>" in page and page.count("data:image/png;base64,") == 2
    assert "alt='reward, KL, clip fraction, completion length'" in page
    # an lm run's page has no GRPO plot
    assert "<h2>GRPO</h2>" not in build(_run_dir(tmp_path)).read_text()
