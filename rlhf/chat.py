"""Conversational data in TRL's format: a prompt or completion is a string, or a list of {"role", "content"} messages
rendered with the tokenizer's chat template (`model.chat_template` where the tokenizer has none)."""

from __future__ import annotations

from typing import Any

from rlhf.errors import UserError


def is_conversational(value: Any) -> bool:
    """A list of mappings is a conversation (TRL's test: the value is a list of dicts)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """The messages of a conversational cell, or a UserError naming the row and what is wrong."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} is {type(value).__name__}, not a string or a list of {{role, content}} messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            shown = repr(message)[:80]
            raise UserError(
                f"{where}: message {i} ({shown}) has no 'role' and 'content'; each message is "
                f'{{"role": "user"|"system"|"assistant", "content": "..."}}'
            )
    return value


def ensure_chat_template(tokenizer, template: str | None, model_name: str) -> None:
    """Give the tokenizer `template` (model.chat_template) where it has none; a UserError when neither has one."""
    if getattr(tokenizer, "chat_template", None):
        return
    if template:
        tokenizer.chat_template = template
        return
    raise UserError(
        f"the data is conversational but the tokenizer of {model_name} has no chat template; set model.chat_template "
        f"to a Jinja template (e.g. one from a chat model of the same family), or give plain-string prompts"
    )


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt as the model sees it: the conversation and the assistant's turn opened (add_generation_prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
