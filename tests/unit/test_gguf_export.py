"""`rayllm export gguf`: the file is written with the `gguf` package and read back by transformers'
GGUF loader (its own reader and dequantizers): f16 gives the source model's greedy tokens exactly,
q8_0 at least 90 % of them, with the tokenizer and chat template inside; adapter folders and registry
refs are merged into their base first (no Ray)."""

import json

import pytest
import torch

from rayllm.cli import main
from rayllm.config import LoraConfig, ModelConfig
from rayllm.gguf_export import GGUFExportError, pre_tokenizer_name, write_gguf
from rayllm.model import apply_lora, build_model, load_model, load_tokenizer
from tests.ray.train_fixtures import make_dataset

PROMPTS = ["the cat sees a red ball.", "my sister paints", "a bird follows the old man and", "three apples"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok = load_tokenizer(make_dataset(root / "data", seq_len=32, n_docs=60, val_docs=4) / "tokenizer")
    # 2 heads of 32 over 1 KV head: the Q and K row permutations differ, as in SmolLM2 (9 heads / 3 KV)
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, max_position_embeddings=64), tok)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


def _greedy(model, tok, prompt: str, n: int = 12) -> list[int]:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()


def _read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32),
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


def test_f16_reads_back_as_the_same_model_tokenizer_and_template(base, tmp_path, capsys):
    out = tmp_path / "f16" / "tiny.gguf"
    assert main(["export", "gguf", str(base), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, tok = load_model(base), load_tokenizer(base)
    back, back_tok = _read_back(out)
    for prompt in PROMPTS:
        assert back_tok(prompt)["input_ids"] == tok(prompt)["input_ids"]
        assert _greedy(back, tok, prompt) == _greedy(model, tok, prompt), prompt
    assert back_tok.chat_template == tok.chat_template
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.parametrize("qtype, least", [("q8_0", 0.9), ("q4_0", 0.0)])
def test_quantized_types_keep_the_greedy_tokens(base, tmp_path, qtype, least):
    import gguf

    out = write_gguf(base, tmp_path / f"tiny-{qtype}.gguf", qtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == qtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    model, tok = load_model(base), load_tokenizer(base)
    back, _ = _read_back(out)
    pairs = [(a, b) for p in PROMPTS for a, b in zip(_greedy(model, tok, p), _greedy(back, tok, p))]
    assert sum(a == b for a, b in pairs) / len(pairs) >= least


def _adapter(base, folder):
    peft = apply_lora(load_model(base), LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)  # a trained-looking adapter (lora_B starts at zero)
    peft.save_pretrained(folder)
    (folder / "rayllm_adapter.json").write_text(json.dumps({"base_model": str(base), "rank": 4}))
    return peft.eval()


def test_adapter_folders_and_registry_refs_are_merged_into_their_base(base, tmp_path, capsys):
    from rayllm.registry import Registry

    peft, tok = _adapter(base, tmp_path / "adapter"), load_tokenizer(base)
    assert main(["export", "gguf", str(tmp_path / "adapter"), str(tmp_path / "a.gguf")]) == 0
    ref = Registry(str(tmp_path / "registry")).publish("tiny", str(tmp_path / "adapter"))
    assert main(["export", "gguf", ref, str(tmp_path / "r.gguf"), "--registry", str(tmp_path / "registry")]) == 0
    plain = load_model(base)
    for path in (tmp_path / "a.gguf", tmp_path / "r.gguf"):
        back, _ = _read_back(path)
        for prompt in PROMPTS[:2]:
            assert _greedy(back, tok, prompt) == _greedy(peft, tok, prompt)
    assert any(_greedy(plain, tok, p) != _greedy(peft, tok, p) for p in PROMPTS), "the adapter changes the answers"

    assert main(["export", "gguf", "tiny@v9", str(tmp_path / "x.gguf"), "--registry", str(tmp_path / "registry")]) == 2
    assert main(["export", "gguf", "tiny@v1", str(tmp_path / "x.gguf")]) == 2
    assert "needs --registry" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_what_cannot_be_written_is_refused_with_the_reason(tmp_path, capsys):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    assert main(["export", "gguf", str(tmp_path / "t5"), str(tmp_path / "t.gguf")]) == 2
    assert "Llama-architecture models only" in capsys.readouterr().err
    with pytest.raises(GGUFExportError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel"}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}]}}) == "smollm"
