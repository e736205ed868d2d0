"""One chat template, for SFT data (`prepare`) and for serving (`/v1/chat/completions`).

`prepare` renders SFT conversations with `render_chat`. Serving does not call it: vLLM renders
chat prompts itself, with the same template — the tokenizer's own (`prepare` saves
`DEFAULT_CHAT_TEMPLATE` into a tokenizer that has none), or `DEFAULT_CHAT_TEMPLATE` passed as
vLLM's `--chat-template` when the served tokenizer has none (serve/vllm_engine.py). So the token
ids a model was fine-tuned on are the ids it is prompted with; tests/unit/test_chat.py checks the
template path both take and tests/ray/test_serve_stack.py the ids of a real chat request.

Which tokens are the assistant's comes from the template's `{% generation %}` markers when it has
them, else from rendering growing prefixes of the conversation and diffing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")

# ChatML with generation markers: the assistant's content and its <|im_end|> are trained, so the
# model learns to stop; role headers and the newline after <|im_end|> are not.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class RenderedChat:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 where the token belongs to an assistant turn

    def labels(self, ignore_index: int = -100) -> list[int]:
        return [t if m else ignore_index for t, m in zip(self.input_ids, self.assistant_mask)]


def validate_messages(messages: Any) -> str | None:
    """Why `messages` is not a usable conversation, or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string role and content"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}"
    return None


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids of a conversation and the mask of its assistant tokens."""
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if "{% generation %}" in template and not add_generation_prompt:
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return RenderedChat(list(out["input_ids"]), list(out["assistant_masks"]))
    ids = _ids(tokenizer, messages, template, add_generation_prompt)
    if add_generation_prompt:
        return RenderedChat(ids, [0] * len(ids))
    return RenderedChat(ids, _prefix_diff_mask(tokenizer, messages, template, ids))


def _ids(tokenizer: Any, messages: list[dict], template: str, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_diff_mask(tokenizer: Any, messages: list[dict], template: str, ids: list[int]) -> list[int]:
    """Assistant tokens of templates without generation markers: each assistant turn is what its
    message adds to the prefix rendered with a generation prompt."""
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:i], template, add_generation_prompt=True))
        end = len(_ids(tokenizer, messages[: i + 1], template, add_generation_prompt=False))
        for j in range(start, min(end, len(ids))):
            mask[j] = 1
    return mask
