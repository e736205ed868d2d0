import pytest

from rayllm.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from rayllm.config.data import TokenizerConfig
from rayllm.data.tokenizer import train_tokenizer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, of course."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [m["content"] for m in CHAT] * 50 + ["some more words for the vocabulary"] * 50
    return train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1), tmp_path_factory.mktemp("tok"))


def test_only_assistant_tokens_carry_labels_in_multi_turn_chats(tok):
    r = render_chat(tok, CHAT)
    labels = r.labels()
    trained = tok.decode([t for t in labels if t != -100])
    assert trained == "Blue.<|im_end|>Green, of course.<|im_end|>"
    assert len(labels) == len(r.input_ids)
    untrained = tok.decode([t for t, m in zip(r.input_ids, r.assistant_mask) if not m])
    assert "You are terse." in untrained and "Name a colour." in untrained and "Blue." not in untrained


def test_generation_prompt_is_the_prefix_of_the_full_rendering(tok):
    prompt = render_chat(tok, CHAT[:2], add_generation_prompt=True)
    full = render_chat(tok, CHAT[:3])
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert tok.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")


def test_templates_without_generation_markers_fall_back_to_prefix_diff(tok):
    with_markers = render_chat(tok, CHAT)
    tok2 = tok.__class__.from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    tok2.chat_template = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    plain = render_chat(tok2, CHAT)
    assert plain.input_ids == with_markers.input_ids
    masked = tok.decode([t for t, m in zip(plain.input_ids, plain.assistant_mask) if m])
    # the fallback also counts the newline after each turn; content and end token match
    assert masked.replace("\n", "") == "Blue.<|im_end|>Green, of course.<|im_end|>"


@pytest.mark.parametrize("template", ["own", "none"])
def test_the_serving_prompt_is_the_render_chat_prompt(tok, template):
    """vLLM renders a chat request with apply_chat_template(tokenize=True, add_generation_prompt=True) and
    the tokenizer's template, or DEFAULT_CHAT_TEMPLATE (its --chat-template) when the tokenizer has none;
    add_special_tokens is off for chat. Those ids must be the ones render_chat gives SFT prompts."""
    served = tok.__class__.from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    if template == "none":
        served.chat_template = None
    vllm_template = served.chat_template or DEFAULT_CHAT_TEMPLATE
    for turns in (CHAT[:2], CHAT[:4]):
        vllm_ids = served.apply_chat_template(turns, chat_template=vllm_template, tokenize=True,
                                              add_generation_prompt=True, return_dict=False)
        assert list(vllm_ids) == render_chat(served, turns, add_generation_prompt=True).input_ids
