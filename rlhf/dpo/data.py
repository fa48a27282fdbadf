"""Preference pairs for DPO: read as `rlhf reward` reads them, then split into prompt and answers.

`load_preferences` is the one place DPO reads pairs; the reader under it is `rlhf.reward_model.data.load_pairs`
(prompt + chosen / rejected, or whole texts, each side ending with EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import DpoConfig, RewardModelConfig
from rlhf.errors import UserError
from rlhf.reward_model.data import load_pairs

READER_FIELDS = ("dataset", "config_name", "train_split", "eval_split", "prompt_column", "chosen_column",
                 "rejected_column", "max_pairs", "eval_pairs", "max_length")  # fmt: skip


@dataclass
class PreferencePairs:
    chosen: list[list[int]]  # token ids of prompt + chosen answer (+ EOS)
    rejected: list[list[int]]
    prompt_lengths: list[int]  # tokens of each pair's prompt: the answers' log-probs are summed after it
    source: str
    n_too_long: int = 0

    def __len__(self) -> int:
        return len(self.chosen)


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split(pairs, cfg: DpoConfig, tokenizer, what: str) -> PreferencePairs:
    """The prompt of a pair is the tokens its two sides share at the start (TRL's rule for pairs without a prompt
    column, here on token ids): with a prompt column, answers that open alike add their shared words to it, which
    cancel in the DPO margin anyway. An identical pair teaches nothing and would make the margin 0 by construction."""
    chosen, rejected, prompts = [], [], []
    for c, r in zip(pairs.chosen, pairs.rejected):
        if c == r:
            text = tokenizer.decode(c, skip_special_tokens=True)
            raise UserError(
                f"preference data '{cfg.dataset}' ({what}): a pair has the same chosen and rejected text "
                f"({text[:60]!r}); a pair must prefer one answer to another: fix or remove it"
            )
        # Each side keeps at least one answer token; the first token stays prompt: it has no context to be scored in.
        p = max(1, min(shared_prefix(c, r), len(c) - 1, len(r) - 1))
        if cfg.max_prompt_length is not None and p > cfg.max_prompt_length:
            cut = p - cfg.max_prompt_length  # keep the end of a long prompt: the part next to the answers
            c, r, p = c[cut:], r[cut:], cfg.max_prompt_length
        chosen.append(c)
        rejected.append(r)
        prompts.append(p)
    return PreferencePairs(chosen, rejected, prompts, pairs.source, pairs.n_too_long)


def load_preferences(cfg: DpoConfig, tokenizer) -> tuple[PreferencePairs, PreferencePairs]:
    """(train pairs, held-out pairs), as `rlhf reward` reads them (`reward_model.data.load_pairs`: the same columns,
    splits, held-out tail and length filter), with the dpo section's settings."""
    reader_cfg = RewardModelConfig(**{k: getattr(cfg, k) for k in READER_FIELDS})
    try:
        train, held_out = load_pairs(reader_cfg, tokenizer)
    except UserError as exc:  # the reader names its settings as rlhf reward's; here they are the dpo section's
        raise UserError(str(exc).replace("reward_model.", "dpo.")) from None
    return _split(train, cfg, tokenizer, reader_cfg.train_split), _split(held_out, cfg, tokenizer, held_out.source)
