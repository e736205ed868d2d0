"""`rayllm export merge`: a LoRA adapter folded into its base gives the adapter's outputs (no Ray)."""

import json

import torch

from rayllm.cli import main
from rayllm.config import LoraConfig, ModelConfig
from rayllm.model import apply_lora, build_model, load_model, load_tokenizer
from tests.ray.train_fixtures import make_dataset


def test_export_merge_folds_the_adapter_into_the_base(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", seq_len=32, n_docs=40, val_docs=4)
    tok = load_tokenizer(data / "tokenizer")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64), tok).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    peft = apply_lora(load_model(base_dir), LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a trained-looking adapter (lora_B starts at zero)
    peft.save_pretrained(adapter_dir)
    (adapter_dir / "rayllm_adapter.json").write_text(json.dumps({"base_model": str(base_dir)}))

    assert main(["export", "merge", str(adapter_dir), str(tmp_path / "merged")]) == 0
    assert "wrote" in capsys.readouterr().out
    ids = torch.tensor([tok("the cat sees a red ball.")["input_ids"]])
    with torch.no_grad():
        want = peft.eval()(input_ids=ids).logits
        got = load_model(tmp_path / "merged")(input_ids=ids).logits
        plain = load_model(base_dir)(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-4) and not torch.allclose(plain, got, atol=1e-3)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()

    (adapter_dir / "rayllm_adapter.json").write_text("{}")
    assert main(["export", "merge", str(adapter_dir), str(tmp_path / "again")]) == 2
    assert "--base" in capsys.readouterr().err


def test_export_names_what_is_wrong_with_its_arguments(tmp_path, capsys):
    assert main(["export", "checkpoint", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "not a rayllm checkpoint folder" in capsys.readouterr().err
    assert main(["export", "merge", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
