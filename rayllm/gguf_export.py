"""`rayllm export gguf`: a Llama-architecture HF folder → one GGUF file for llama.cpp and Ollama,
with the tokenizer and chat template inside and an Ollama `Modelfile` beside it.

The file is written with the `gguf` package (its writer, tensor-name map, special-vocab reader and
numpy quantizers); what is here is only the mapping from an HF folder onto those calls. Two layout
conventions of llama.cpp are applied because GGUF readers undo them: Q and K projection rows are
interleaved per head (llama.cpp's rotary layout, which transformers' GGUF loader permutes back), and
a tied output head is left out (readers reuse the token embedding).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TYPES = ("f16", "q8_0", "q4_0")
# llama.cpp's name for the pre-tokenizer: which regex splits text before BPE merges.
_PRE_BY_SPLITS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}


class GGUFExportError(ValueError):
    """A source that cannot be written as GGUF, with the reason."""


def write_gguf(src: str | Path, out: str | Path, qtype: str = "f16") -> Path:
    """Write the HF folder `src` (config.json, safetensors, tokenizer) as `out` (a .gguf file) in
    `qtype` (f16, q8_0 or q4_0; norms stay f32), and an Ollama Modelfile beside it. Returns `out`."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out)
    if qtype not in TYPES:
        raise GGUFExportError(f"--type {qtype!r}: choose one of {', '.join(TYPES)}")
    if not (src / "config.json").is_file():
        raise GGUFExportError(f"{src} is not an HF model folder (no config.json)")
    config = AutoConfig.from_pretrained(src)
    if config.model_type != "llama":
        raise GGUFExportError(f"{src} is a {config.model_type!r} model; GGUF export writes Llama-architecture models only")
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="float32")

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, src.name, qtype)
    _add_tokenizer(writer, tokenizer, src)
    _add_tensors(writer, model.state_dict(), config, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    write_modelfile(out, tokenizer)
    return out


def _add_hparams(writer, config, name: str, qtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json (plain ByteLevel → gpt-2,
    digits split one by one then ByteLevel → smollm); anything else is refused, since a wrong name
    would make llama.cpp split text differently from the model's own tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = tuple(step.get("type") for step in steps)
    if kinds in _PRE_BY_SPLITS and (kinds[0] != "Digits" or steps[0].get("individual_digits")):
        return _PRE_BY_SPLITS[kinds]
    raise GGUFExportError(f"pre-tokenizer {kinds} has no llama.cpp equivalent here (byte-level BPE with "
                          "ByteLevel, or Digits + ByteLevel, is supported)")


def _add_tokenizer(writer, tokenizer, src: Path) -> None:
    import gguf

    tokenizer_json = json.loads((src / "tokenizer.json").read_text()) if (src / "tokenizer.json").is_file() else {}
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise GGUFExportError(f"{src}: only byte-level BPE tokenizers (tokenizer.json of type BPE) are exported")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    by_id = {i: t for t, i in vocab.items()}
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.USER_DEFINED if token in added
                     else gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/pad ids and add_bos flags, read from the folder by gguf's own reader
    special_vocab = gguf.SpecialVocab(src, load_merges=True, n_vocab=size)
    if special_vocab.chat_template is None and tokenizer.chat_template:  # a template the reader did not find
        special_vocab.chat_template = tokenizer.chat_template
    special_vocab.add_to_gguf(writer, quiet=True)


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary row order → llama.cpp's (pairs interleaved per head)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tensors(writer, state: dict, config, qtype: str) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    quant = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(qtype)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"tensor {hf_name} has no GGUF name in the Llama map")
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1:  # norms stay f32, as llama.cpp keeps them
            writer.add_tensor(name, data.astype(np.float32))
        elif quant is not None and data.shape[-1] % gguf.GGML_QUANT_SIZES[quant][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:  # f16, or rows too short for a quantization block (llama.cpp falls back the same way)
            writer.add_tensor(name, data.astype(np.float16))


def write_modelfile(gguf_path: Path, tokenizer) -> Path:
    """An Ollama Modelfile beside the GGUF: FROM the file, the chat template in Ollama's template
    language for ChatML models, and the end-of-turn token as a stop."""
    lines = [f"FROM ./{gguf_path.name}"]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template:
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    if tokenizer.eos_token and tokenizer.eos_token != "<|im_end|>":
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def export_source(src: str, out: str | Path, qtype: str, registry_root: str | None = None) -> Path:
    """`rayllm export gguf SRC OUT`: SRC is an HF model folder, a LoRA adapter folder (merged into
    the base its rayllm_adapter.json names first) or, with a registry, a ref (`name@vN`,
    `name:alias`, verified on read) whose adapter is merged the same way."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rayllm-gguf-") as tmp:
        folder = Path(src)
        if registry_root is not None and not folder.exists():
            from rayllm.registry import Registry

            folder = Path(Registry(registry_root).localize(src, cache_dir=tmp).path)
        if not folder.is_dir():
            hint = " (a registry ref needs --registry ROOT)" if registry_root is None else ""
            raise GGUFExportError(f"{src}: no such model or adapter folder{hint}")
        if (folder / "adapter_config.json").is_file():
            folder = _merged(folder, Path(tmp) / "merged")
        return write_gguf(folder, out, qtype)


def _merged(adapter: Path, out: Path) -> Path:
    """The adapter folded into the base its rayllm_adapter.json names."""
    from rayllm.train import export

    meta = adapter / export.ADAPTER_META
    base = json.loads(meta.read_text()).get("base_model") if meta.is_file() else None
    if not base or not (Path(base) / "config.json").is_file():
        raise GGUFExportError(f"adapter {adapter} names no base model folder that exists (base_model: {base!r}); "
                              "merge it first with `rayllm export merge ADAPTER OUT --base BASE` and export that folder")
    return export.merge_lora(base, adapter, out)
