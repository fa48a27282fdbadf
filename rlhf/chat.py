"""Prompts and conversations as token ids, the same way for SFT and for RL, following TRL's conventions.

A prompt is a string (tokenized with the tokenizer's defaults, as TRL's SFT and GRPO trainers do) or a list of
`{role, content}` messages (rendered with the chat template and the generation prompt). SFT trains on the prompt
followed by its completion; RL generates after the same prompt ids, so what the model learned to continue is what it is
asked to continue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.errors import UserError

# A ChatML template (the format of SmolLM2, Qwen and many others) whose assistant turns are marked with
# `{% generation %}`, so that transformers can return the assistant-token mask directly. `model.chat_template: chatml`
# gives it to a tokenizer that has none (the tiny fixture, gpt-neox-20b).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHIPPED_TEMPLATES = {"chatml": CHATML}


def is_conversation(value: Any) -> bool:
    """A list of messages (dicts with a role), as TRL's `is_conversational` tells a conversational value."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def check_messages(messages: Any, where: str) -> list[dict]:
    """`messages` as a list of {role, content} dicts, or a UserError naming the row and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a list of {{role, content}} messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            keys = ", ".join(message) if isinstance(message, dict) else type(message).__name__
            raise UserError(
                f"{where}: message {i} has no role/content (it has: {keys}); each message is "
                f'{{"role": "user" | "assistant" | "system", "content": "..."}}'
            )
    return messages


def resolve_template(value: str) -> str:
    """`model.chat_template`: a shipped name (chatml), a path to a Jinja file, or the template text itself."""
    if value in SHIPPED_TEMPLATES:
        return SHIPPED_TEMPLATES[value]
    if "{" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.chat_template '{value}' is not a shipped template ({', '.join(SHIPPED_TEMPLATES)}), "
                f"a file, or a Jinja template; pass one of those"
            )
        return path.read_text()
    return value


def set_chat_template(tokenizer, template: str | None) -> None:
    """Give the tokenizer `model.chat_template` when the recipe sets one (it then wins over the tokenizer's own)."""
    if template:
        tokenizer.chat_template = resolve_template(template)


def require_chat_template(tokenizer, model_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the data is conversational but {model_name}'s tokenizer has no chat template; set "
            f"model.chat_template (chatml, a .jinja file, or the template text)"
        )


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` through the chat template (which adds any BOS itself)."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The ids a model is asked to continue: a string with the tokenizer's defaults (a BOS where it adds one, as TRL's
    trainers tokenize), or messages through the chat template with the generation prompt."""
    if isinstance(prompt, list):
        return render_ids(tokenizer, prompt, add_generation_prompt=True)
    return list(tokenizer(prompt)["input_ids"])


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share: where a completion starts when the prompt's last token merges with
    the completion's first, or a template renders a prompt alone differently. TRL's `common_prefix_length`, written
    out because trl is no runtime dependency of rlhf."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
