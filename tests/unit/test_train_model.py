"""Model building, document-aware attention, LoRA wrapping and the base fingerprint (no Ray)."""

import pytest
import torch

from rayllm.config import LoraConfig, ModelConfig
from rayllm.model import apply_lora, base_fingerprint, build_model, count_trainable, load_tokenizer
from rayllm.train.data import PackedSplit
from tests.ray.train_fixtures import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"), seq_len=64, n_docs=60, val_docs=8)


@pytest.fixture(scope="module")
def tokenizer(dataset):
    return load_tokenizer(dataset / "tokenizer")


def tiny(**kw):
    return ModelConfig(**{"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 128, **kw})


def test_build_model_matches_config_and_tokenizer(tokenizer):
    model = build_model(tiny(num_kv_heads=2), tokenizer, seed=1)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads) == (len(tokenizer), 64, 2, 2)
    assert (c.eos_token_id, c.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    again = build_model(tiny(num_kv_heads=2), tokenizer, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters())), "same seed, same init"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(dataset, tokenizer, attn):
    """With per-document position_ids, each document's logits equal those of the document alone."""
    model = build_model(tiny(attn_implementation=attn), tokenizer, seed=0).eval()
    split = PackedSplit.read(dataset, "train")
    row = next(i for i in range(len(split)) if len(set(split.doc_ids[i]) - {-1}) >= 3)
    batch = split.batch([row])
    docs = split.doc_ids[row]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        unmasked = model(input_ids=batch["input_ids"]).logits[0]
        for d in sorted(set(docs) - {-1})[1:]:
            cols = torch.from_numpy((docs == d).nonzero()[0])
            alone = model(input_ids=batch["input_ids"][:, cols]).logits[0]
            torch.testing.assert_close(packed[cols], alone, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(unmasked[cols], alone, atol=1e-3), "without masking, earlier documents leak in"


def test_labels_drop_targets_across_document_starts(dataset):
    split = PackedSplit.read(dataset, "train")
    row = next(i for i in range(len(split)) if len(set(split.doc_ids[i]) - {-1}) >= 2)
    masked, plain = split.batch([row], True), split.batch([row], False)
    starts = [j for j in range(1, 64) if split.doc_ids[row][j] != split.doc_ids[row][j - 1] and split.doc_ids[row][j] != -1]
    assert starts and all(masked["labels"][0, j] == -100 for j in starts)
    assert all(plain["labels"][0, j] != -100 for j in starts)
    assert "position_ids" not in plain and masked["position_ids"][0, starts[0]] == 0
    assert split.target_tokens([row], True) == split.target_tokens([row], False) - len(starts)


def test_lora_leaves_only_adapter_weights_trainable(tokenizer):
    model = apply_lora(build_model(tiny(), tokenizer), LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    n_trainable, _ = count_trainable(model)
    assert n_trainable == 2 * 2 * 4 * (64 + 64)  # layers × modules × rank × (in + out)


def test_base_fingerprint_follows_config_and_vocab_not_path(tmp_path, tokenizer, dataset):
    model = build_model(tiny(), tokenizer)
    fp = base_fingerprint(model, tokenizer)
    assert fp.startswith("sha256:")
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        assert base_fingerprint(tmp_path / name) == fp, "same base wherever it is stored"
    assert base_fingerprint(apply_lora(model, LoraConfig(rank=2)), tokenizer) == fp, "a PEFT wrapper names its base"
    assert base_fingerprint(build_model(tiny(num_layers=3), tokenizer), tokenizer) != fp
    other = make_dataset(tmp_path / "other", seq_len=64, n_docs=30, val_docs=4, seed=7)
    assert base_fingerprint(model, load_tokenizer(other / "tokenizer")) != fp


def test_a_tokenizers_backend_folder_loads_as_autotokenizer_would_without_the_model_registry(dataset, tmp_path):
    """`load_tokenizer` builds the class tokenizer_config.json names (TokenizersBackend, what prepare
    trains and SmolLM2 ships) without importing AutoTokenizer's module, which imports transformers'
    model registry; the tokenizer equals AutoTokenizer's. Another class goes through AutoTokenizer."""
    import json
    import shutil
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from rayllm.model import resolve_base

    for folder in (dataset / "tokenizer", resolve_base("smollm2")):
        ours, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        assert type(ours) is type(auto)
        text = "The cat sees 12 dogs.<|im_end|> Botchan here!"
        assert ours(text)["input_ids"] == auto(text)["input_ids"] and ours.get_vocab() == auto.get_vocab()
        assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id)
        assert ours.chat_template == auto.chat_template

    code = ("import sys\nfrom rayllm.model import load_tokenizer\n"
            f"load_tokenizer({str(dataset / 'tokenizer')!r})\n"
            "print('registry', 'transformers.models.auto.modeling_auto' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "registry False" in out.stdout, out.stderr[-2000:]

    other = tmp_path / "other"
    shutil.copytree(dataset / "tokenizer", other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert type(load_tokenizer(other)).__name__ == type(AutoTokenizer.from_pretrained(other)).__name__
