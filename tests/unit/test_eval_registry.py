"""`rayllm eval` over registry versions without Ray (perplexity only): two published versions of an
adapter and their base, side by side; each version's figures land in its manifest, and the adapter's
figure is PEFT's own loss on the same rows."""

import json

import pytest


@pytest.fixture
def world(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rayllm.registry import Registry
    from tests.ray.train_fixtures import make_dataset

    dataset = make_dataset(tmp_path / "data", seq_len=32, n_docs=60, val_docs=20)
    tok = AutoTokenizer.from_pretrained(dataset / "tokenizer")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, max_position_embeddings=64, pad_token_id=tok.pad_token_id))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    reg = Registry(str(tmp_path / "reg"))
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5)
        out = tmp_path / f"adapter{seed}"
        peft_model.save_pretrained(out)
        (out / "rayllm_adapter.json").write_text(json.dumps({"base_model": str(tmp_path / "base"), "rank": 4}))
        reg.publish("bot", str(out))
    reg.promote("bot:prod", 2)
    return tmp_path, dataset, reg


def test_versions_and_base_side_by_side_with_figures_in_the_manifests(world, capsys):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from rayllm.config import parse_config
    from rayllm.eval.run import run
    from rayllm.train.data import PackedSplit

    tmp, dataset, reg = world
    cfg = parse_config({"registry": {"path": str(tmp / "reg")}, "eval": {
        "name": "cmp", "output_dir": str(tmp / "out"), "dataset": str(dataset), "max_sequences": 4, "document_masking": False,
        "targets": [{"ref": "bot@v1"}, {"ref": "bot:prod"}, {"path": str(tmp / "base"), "label": "base"}]}})
    report = run(cfg)
    figures = report["metrics"]
    assert list(figures) == ["bot@v1", "bot@v2", "base"] and len({f["ppl"] for f in figures.values()}) == 3
    assert [t["registry_ref"] for t in report["targets"]] == ["bot@v1", "bot@v2", None]
    assert report["targets"][1]["ref"] == "bot:prod"
    for v in (1, 2):
        recorded = reg.show(f"bot@v{v}", verify=True)["manifest"]["eval"]["cmp"]
        assert recorded["metrics"] == figures[f"bot@v{v}"] and recorded["report"].endswith("eval.json")
    printed = capsys.readouterr().out
    assert "bot@v1" in printed and "bot@v2" in printed and "base" in printed

    # PEFT's own mean loss over the same rows (no document masking: plain HF labels)
    rows = PackedSplit.read(dataset, "val").batch(list(range(4)), document_masking=False)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp / "base"), str(tmp / "reg" / "bot" / "v2")).eval()
    with torch.no_grad():
        hf_loss = model(input_ids=rows["input_ids"], labels=rows["labels"]).loss.item()
    assert figures["bot@v2"]["val_loss"] == pytest.approx(hf_loss, rel=1e-5)
