"""rayllm eval's pure parts: the `eval:` config, task rows (bad rows counted), the metric functions
against sacrebleu's and rouge-score's own figures, target resolution and one-line errors."""

import json
from pathlib import Path

import pytest

from rayllm.config import ConfigError, parse_config
from rayllm.eval import tasks
from rayllm.eval.targets import EvalError, check_inputs, resolve_targets


def _cfg(tmp_path, **eval_section):
    raw = {"registry": {"path": str(tmp_path / "reg")}, "eval": {"targets": [{"path": "x"}], "dataset": "d", **eval_section}}
    return parse_config(raw)


def test_config_rejects_every_mistake_at_once_naming_the_key(tmp_path):
    raw = {"eval": {"targets": [{"path": "a", "ref": "bot@v1"}, {"ref": "bot@3"}, {"endpoint": {"url": "localhost:8000", "model": "m"}}],
                    "generation": [{"name": "qa", "path": "q.jsonl", "metrics": ["bleu", "meteor"]}], "split": "test", "colour": 1}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = "\n".join(err.value.problems)
    assert "eval.targets.0: " in text and "exactly one of path, ref, endpoint (got path, ref)" in text
    assert "eval.targets.1: " in text and "must be vN" in text
    assert "eval.targets.2.endpoint.url" in text
    assert "eval.generation.0.metrics.1" in text and "eval.split" in text
    assert "eval.colour: unknown key" in text


def test_config_needs_something_to_evaluate_and_distinct_labels():
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        parse_config({"eval": {"targets": [{"path": "a"}]}})
    with pytest.raises(ConfigError, match="labels must differ: a"):
        parse_config({"eval": {"targets": [{"path": "x", "label": "a"}, {"path": "y", "label": "a"}], "dataset": "d"}})
    cfg = parse_config({"eval": {"targets": [{"ref": "bot:prod"}, {"endpoint": {"url": "http://h:1/v1", "model": "base"}}],
                                 "generation": [{"name": "qa", "path": "q.jsonl"}]}})
    assert cfg.eval.generation[0].metrics == ["bleu", "rougeL", "exact_match", "f1"] and cfg.eval.split == "val"


def test_relative_eval_paths_resolve_against_the_storage_root(tmp_path):
    cfg = parse_config({"storage": str(tmp_path), "eval": {"targets": [{"path": "x"}], "dataset": "data/sft", "output_dir": "runs/eval"}})
    assert cfg.eval.dataset == str(tmp_path / "data/sft") and cfg.eval.output_dir == str(tmp_path / "runs/eval")


def test_task_rows_count_bad_rows_by_reason_and_keep_the_good(tmp_path):
    f = tmp_path / "qa.jsonl"
    lines = [
        json.dumps({"prompt": "capital of France?", "reference": "Paris"}),
        "{not json",
        json.dumps({"prompt": "two refs", "references": ["a", "b"]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "reference": "hello"}),
        json.dumps({"prompt": "no reference"}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}], "reference": "y"}),
        json.dumps(["a list"]),
        "",
    ]
    f.write_text("\n".join(lines) + "\n")
    found = tasks.read_rows(f)
    assert [r.index for r in found.rows] == [1, 3, 4]
    assert found.rows[1].references == ["a", "b"] and found.rows[2].messages[0]["content"] == "hi"
    assert found.bad == {"invalid_json": 1, "missing_field": 1, "bad_messages": 1, "wrong_type": 1}
    line = found.summary(str(f))
    assert "4 bad rows skipped" in line and "first at line 2: invalid_json" in line and "\n" not in line
    assert [r.index for r in tasks.read_rows(f, max_rows=2).rows] == [1, 3]


OUTS = ["the cat sat on the mat", "Paris.", "a dog barks loudly at night", "the answer is 42"]
REFS = [["the cat sat on a mat", "a cat is on the mat"], ["paris"], ["the dog barks at night"], ["42"]]


def test_bleu_and_rouge_are_the_libraries_own_figures():
    import sacrebleu
    from rouge_score import rouge_scorer

    padded = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
    assert tasks.bleu(OUTS, REFS) == pytest.approx(sacrebleu.corpus_bleu(OUTS, padded).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 100 * sum(max(scorer.score(r, o)["rougeL"].fmeasure for r in refs) for o, refs in zip(OUTS, REFS)) / len(OUTS)
    assert tasks.rouge_l(OUTS, REFS) == pytest.approx(expected)


def test_exact_match_and_f1_use_squad_normalisation():
    # once case, punctuation and articles are dropped: "Paris." == "paris", "the cat sat on the mat" == "the cat sat
    # on a mat"; "the answer is 42" vs "42": precision 1/3, recall 1, F1 0.5
    assert tasks.exact_match(OUTS, REFS) == pytest.approx(100 * 2 / 4)
    f1 = tasks.token_f1(["Paris.", "the answer is 42"], [["paris"], ["42"]])
    assert f1 == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert tasks.score(["exact_match"], ["An apple"], [["apple"]]) == {"exact_match": 100.0}


def test_prompts_render_through_the_one_chat_rendering():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from rayllm.chat import DEFAULT_CHAT_TEMPLATE, render_chat

    vocab = {c: i for i, c in enumerate(["<|im_start|>", "<|im_end|>", "<|eos|>", *"abcdefghijklmnopqrstuvwxyz\n ?"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|eos|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    row = tasks.Row(1, "hi?", None, ["yo"])
    expected = render_chat(fast, [{"role": "user", "content": "hi?"}], add_generation_prompt=True).input_ids
    assert tasks.prompt_ids(fast, row, chat=True) == expected
    assert tasks.prompt_ids(fast, row, chat=False) == fast("hi?", add_special_tokens=False)["input_ids"]


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def _adapter(folder: Path, base: Path | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    (folder / "rayllm_adapter.json").write_text(json.dumps({"base_model": str(base) if base else None, "rank": 4}))
    return folder


def test_targets_resolve_folders_run_dirs_and_registry_refs_to_exact_versions(tmp_path):
    from rayllm.registry import Registry

    base = _model(tmp_path / "base")
    adapter = _adapter(tmp_path / "runs" / "lora" / "adapter", base)
    (tmp_path / "runs" / "lora" / "result.json").write_text(json.dumps({"status": "finished", "adapter_dir": str(adapter)}))
    reg = Registry(str(tmp_path / "reg"))
    reg.publish("bot", str(adapter))
    reg.publish("bot", str(adapter))
    reg.promote("bot:prod", {1: 90, 2: 10})
    cfg = parse_config({"registry": {"path": str(tmp_path / "reg")}, "eval": {"dataset": "d", "targets": [
        {"path": str(base)}, {"path": str(tmp_path / "runs" / "lora")}, {"ref": "bot@v2"}, {"ref": "bot:prod"},
        {"path": str(adapter), "label": "lora"}]}})
    got = resolve_targets(cfg)
    assert [(t.label, t.kind) for t in got] == [("base", "model"), ("lora", "adapter"), ("bot@v2", "adapter"), ("bot@v1", "adapter"),
                                              ("bot@v2#2", "adapter"), ("lora#2", "adapter")]
    assert got[1].model_dir == str(base.resolve()) and got[1].adapter_dir == str(adapter.resolve())
    assert got[2].registry_ref == "bot@v2" and got[2].adapter_dir == str(tmp_path / "reg" / "bot" / "v2")
    assert got[3].facts["ref"] == "bot:prod" and got[3].registry_ref == "bot@v1"


@pytest.mark.parametrize("target, message", [
    ({"path": "/nonexistent/model"}, "eval.targets[0].path: /nonexistent/model does not exist"),
    ({"ref": "bot@v7"}, "eval.targets[0].ref: bot@v7: bot@v7 does not exist (committed versions: v1)"),
    ({"ref": "bot:canary"}, "eval.targets[0].ref: bot:canary: alias bot:canary does not exist"),
    ({"ref": "ghost"}, "eval.targets[0].ref: ghost: no published versions of 'ghost'"),
    ({"endpoint": {"url": "http://127.0.0.1:9", "model": "m", "api_key_env": "RAYLLM_TEST_NO_SUCH_KEY"}},
     "eval.targets[0].endpoint.api_key_env: environment variable RAYLLM_TEST_NO_SUCH_KEY is not set"),
])
def test_bad_targets_are_one_line_errors_naming_the_target(tmp_path, target, message):
    from rayllm.registry import Registry

    base = _model(tmp_path / "base")
    Registry(str(tmp_path / "reg")).publish("bot", str(_adapter(tmp_path / "a", base)))
    cfg = parse_config({"registry": {"path": str(tmp_path / "reg")}, "eval": {"dataset": "d", "targets": [target]}})
    with pytest.raises(EvalError) as err:
        resolve_targets(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_adapter_without_a_base_and_a_folder_of_nothing_are_refused(tmp_path):
    cfg = parse_config({"eval": {"dataset": "d", "targets": [{"path": str(_adapter(tmp_path / "a", None))}]}})
    with pytest.raises(EvalError, match=r"names no base model; set base: BASE_FOLDER"):
        resolve_targets(cfg)
    (tmp_path / "empty").mkdir()
    cfg = parse_config({"eval": {"dataset": "d", "targets": [{"path": str(tmp_path / "empty")}]}})
    with pytest.raises(EvalError, match="is not an HF model folder, an adapter folder or a run directory"):
        resolve_targets(cfg)


def test_missing_inputs_are_named_before_anything_starts(tmp_path):
    cfg = parse_config({"eval": {"dataset": str(tmp_path / "nodata"), "targets": [{"path": "x"}],
                                 "generation": [{"name": "qa", "path": str(tmp_path / "qa.jsonl")}]}})
    problems = check_inputs(cfg)
    assert problems[0].startswith("eval.dataset: ") and "rayllm prepare" in problems[0]
    assert problems[1].startswith("eval.generation[0].path: ") and "does not exist" in problems[1]


def test_unreachable_endpoint_fails_fast_with_one_line(tmp_path):
    import socket
    import time

    from rayllm.eval import endpoint
    from rayllm.config.eval import EndpointConfig

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(EvalError, match=rf"target 'x': http://127.0.0.1:{port} is unreachable"):
        endpoint.check(EndpointConfig(url=f"http://127.0.0.1:{port}/v1", model="m"), 2.0, "target 'x'")
    assert time.perf_counter() - t0 < 5


def test_report_writes_json_csv_and_a_side_by_side_table(tmp_path):
    import csv

    from rich.console import Console

    from rayllm.eval import report
    from rayllm.eval.targets import Target

    targets = [Target("v1", "adapter", "bot@v1", registry_ref="bot@v1"), Target("base", "model", "/m")]
    figures = {"v1": {"ppl": 3.2, "qa/bleu": 10.0}, "base": {"ppl": 4.5}}
    written = report.write(tmp_path, "cmp", targets, figures, {"tasks": {}})
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == figures == written["metrics"]
    rows = list(csv.reader(open(tmp_path / "eval.csv")))
    assert rows == [["metric", "v1", "base"], ["ppl", "3.2", "4.5"], ["qa/bleu", "10.0", ""]]
    console = Console(width=80, record=True)
    console.print(report.table(figures, "cmp"))
    text = console.export_text()
    assert "v1" in text and "base" in text and "3.2000" in text and "—" in text


def test_lm_eval_results_flatten_to_task_metric_names():
    from rayllm.eval.harness import flatten

    got = flatten({"tiny": {"alias": "tiny", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4, "em,strict": 1.0}})
    assert got == {"tiny/acc": 0.5, "tiny/acc_stderr": 0.1, "tiny/em[strict]": 1.0}


def test_lm_eval_backend_per_target_kind():
    from rayllm.config.eval import EndpointConfig, HarnessConfig
    from rayllm.eval.harness import backend
    from rayllm.eval.targets import Target

    h = HarnessConfig(tasks=["t"], max_length=512)
    model, args, chat = backend(Target("a", "adapter", "p", model_dir="/base", adapter_dir="/ad"), h, 4, 30)
    assert (model, chat) == ("hf", False) and args["pretrained"] == "/base" and args["peft"] == "/ad" and args["max_length"] == 512
    ep = EndpointConfig(url="http://h:8000/v1/", model="bot:prod", tokenizer="/tok")
    model, args, chat = backend(Target("e", "endpoint", "u", endpoint=ep), h, 4, 30)
    assert model == "local-completions" and args["base_url"] == "http://h:8000/v1/completions" and args["tokenized_requests"]
    assert args["num_concurrent"] == 4 and args["max_length"] == 512 and args["tokenizer"] == "/tok" and not chat
    model, args, chat = backend(Target("e", "endpoint", "u", endpoint=EndpointConfig(url="http://h:8000", model="m")), h, 4, 30)
    assert model == "local-chat-completions" and args["base_url"] == "http://h:8000/v1/chat/completions" and chat
