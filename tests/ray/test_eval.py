"""`rayllm eval` on the real stack, in one call shared by every assertion: a tiny Llama trained once by
the real trainer (Ray Train + DeepSpeed, 2 workers), then evaluated from its run directory —
perplexity on the val rows the trainer's own evaluation covered, a generation task on vLLM in a Ray
Data actor pool, and an lm-eval task through its Python API (hf backend)."""

import json
from pathlib import Path

import pytest

from tests.ray.train_fixtures import make_dataset, tiny_config, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MICRO, WORKERS, EVAL_BATCHES = 4, 2, 2


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, _shared_ray):
    """(train result, eval report, eval output folder)."""
    from rayllm.config import parse_config
    from rayllm.eval.run import run

    _shared_ray.ensure()
    tmp = tmp_path_factory.mktemp("eval")
    dataset = make_dataset(tmp / "data", seq_len=64, n_docs=200, val_docs=60)
    raw = tiny_config(dataset, tmp / "runs", run_name="tiny", max_steps=6, eval_every=6, save_every=6, warmup_steps=1,
                      micro_batch_size=MICRO, num_workers=WORKERS, eval_batches=EVAL_BATCHES,
                      model={"num_heads": 2})  # head size 32: vLLM's CPU attention has no 16
    result = train(raw)
    assert result["status"] == "finished", result
    cfg = parse_config({"eval": {
        "name": "tiny", "output_dir": str(tmp / "eval"), "targets": [{"path": str(tmp / "runs" / "tiny")}],
        "dataset": str(dataset), "max_sequences": MICRO * WORKERS * EVAL_BATCHES,
        # chat: false — a model pretrained for 6 steps continues plain text; `messages` rows still go through the template
        "generation": [{"name": "qa", "path": str(ROOT / "jobs/data/eval/qa.jsonl"), "max_new_tokens": 8, "chat": False}],
        "harness": {"tasks": ["rayllm_tiny_cloze"], "include_path": str(ROOT / "jobs/data/eval/harness"), "limit": 4},
        "engine": {"batch_size": 16, "max_model_len": 128, "dtype": "float32"},
    }})
    return result, run(cfg), tmp / "eval" / "tiny"


def hf_greedy_text(model_dir: Path, prompt: str, max_new: int) -> str:
    """transformers' greedy continuation, stopped and decoded as the eval's vLLM path does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayllm.eval.generate import stop_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=stop_ids(tok),
                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    return tok.decode(out, skip_special_tokens=True)


@pytest.mark.timeout(600)
def test_perplexity_is_the_trainers_val_ppl(evaluated):
    result, report, _ = evaluated
    figures = report["metrics"]["tiny"]
    assert abs(figures["ppl"] - result["val_ppl"]) / result["val_ppl"] < 1e-3, (figures["ppl"], result["val_ppl"])
    assert abs(figures["val_loss"] - result["val_loss"]) / result["val_loss"] < 1e-3
    assert report["targets"][0]["model_dir"] == str(Path(result["model_dir"]).resolve())


@pytest.mark.timeout(600)
def test_generation_on_vllm_gives_the_libraries_own_figures(evaluated):
    import sacrebleu
    from rouge_score import rouge_scorer

    _, report, out = evaluated
    rows = [json.loads(line) for line in (out / "generations" / "qa.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and any(r["output"].strip() for r in rows)
    assert rows[0]["output"] == hf_greedy_text(Path(report["targets"][0]["model_dir"]), "the cat sees", 8)
    outs, refs = [r["output"] for r in rows], [r["references"] for r in rows]
    width = max(len(r) for r in refs)
    bleu = sacrebleu.corpus_bleu(outs, [[r[k] if k < len(r) else None for r in refs] for k in range(width)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = 100 * sum(max(scorer.score(x, o)["rougeL"].fmeasure for x in r) for o, r in zip(outs, refs)) / len(outs)
    figures = report["metrics"]["tiny"]
    assert figures["qa/bleu"] == pytest.approx(bleu) and figures["qa/rougeL"] == pytest.approx(rouge)
    assert 0 <= figures["qa/exact_match"] <= 100 and 0 <= figures["qa/f1"] <= 100
    assert report["tasks"]["qa"]["rows"] == 6 and report["tasks"]["qa"]["bad_rows"] == 0
    csv_rows = (out / "eval.csv").read_text().splitlines()
    assert csv_rows[0] == "metric,tiny" and any(r.startswith("qa/bleu,") for r in csv_rows)


@pytest.mark.timeout(600)
def test_lm_eval_task_runs_against_the_folder(evaluated):
    _, report, _ = evaluated
    figures = report["metrics"]["tiny"]
    assert 0.0 <= figures["harness/rayllm_tiny_cloze/acc"] <= 1.0
