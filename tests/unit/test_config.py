import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rayllm.config import ConfigError, load_config, parse_config
from rayllm.config.docs import END, START, reference

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_three_mistakes_give_three_messages(tmp_path):
    p = write(tmp_path, """
        data:
          inputs: [corpus.txt]
          output_dir: out
          seq_len: -4
          val_fraction: 1.5
          colour: blue
        """)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    problems = err.value.problems
    assert len(problems) == 3, problems
    by_key = {p.split(":")[0]: p for p in problems}
    assert "greater than or equal to 8" in by_key["data.seq_len"] and "-4" in by_key["data.seq_len"]
    assert "less than 1" in by_key["data.val_fraction"]
    assert "unknown key" in by_key["data.colour"] and "seq_len" in by_key["data.colour"]  # lists the valid keys


def test_missing_key_wrong_literal_and_cross_field_rules():
    with pytest.raises(ConfigError) as err:
        parse_config({"data": {"inputs": ["x"], "mode": "chat"}, "train": {"dataset": "d", "zero_stage": 2, "offload_param": "cpu"}})
    text = str(err.value)
    assert "data.output_dir: required key is missing" in text
    assert "data.mode" in text and "'pretrain', 'sft' or 'preference'" in text
    assert "offload_param=cpu needs zero_stage 3" in text


def test_unknown_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown key; valid keys here: data, eval, model, registry, serve, storage, train, tune"):
        parse_config({"dataz": {}})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_valid_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "data: {inputs: [a.txt], output_dir: out}\n"))
    assert cfg.data.seq_len == 512 and cfg.data.tokenizer.vocab_size == 8192 and cfg.train is None


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from rayllm.config import RayllmConfig
    from rayllm.config.docs import _model_class

    seen, todo = set(), [RayllmConfig]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            sub = _model_class(field.annotation)
            if sub is not None and issubclass(sub, BaseModel):
                todo.append(sub)


def test_readme_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    start, end = text.index(START), text.index(END) + len(END)
    assert text[start:end] == reference(), "README config reference is stale: run `python -m rayllm.config.docs --write`"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "rayllm", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_validate_verb_reports_all_errors_and_exits_nonzero(tmp_path):
    p = write(tmp_path, "data: {inputs: [], output_dir: out, seq_len: 0}\n")
    r = _run("validate", str(p))
    assert r.returncode == 2
    assert "2 problem(s)" in r.stderr and "data.inputs" in r.stderr and "data.seq_len" in r.stderr
    ok = write(tmp_path, "data: {inputs: [a.txt], output_dir: out}\n")
    r = _run("validate", str(ok))
    assert r.returncode == 0 and "ok (sections: data, registry)" in r.stdout


def test_verb_refuses_a_config_without_its_section(tmp_path):
    p = write(tmp_path, "data: {inputs: [a.txt], output_dir: out}\n")
    r = _run("serve", str(p))
    assert r.returncode == 2 and "serve: section required" in r.stderr


def test_help_imports_no_heavy_module():
    code = (
        "import sys\n"
        "from rayllm.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('ray', 'torch', 'deepspeed', 'vllm', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr
    assert "prepare" in r.stdout and "serve" in r.stdout
