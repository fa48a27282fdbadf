"""Preference pairs for DPO: read by `rlhf.preferences` (TRL's explicit and implicit forms, chat messages rendered,
the held-out pairs), tokenized as TRL's DPOTrainer tokenizes them, each answer ending with EOS as TRL adds it (unless
dpo.add_eos is false).

The answers' log-probs are summed after the prompt: `prompt_lengths` says where each pair's answers begin.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import DpoConfig
from rlhf.errors import UserError
from rlhf.preferences import Pair, Preferences, encode, load_preferences


@dataclass
class PreferencePairs:
    chosen: list[list[int]]  # token ids of prompt + chosen answer (+ EOS: dpo.add_eos)
    rejected: list[list[int]]
    prompt_lengths: list[int]  # tokens of each pair's prompt: the answers' log-probs are summed after it
    source: str
    n_too_long: int = 0  # pairs left out: a side longer than max_length tokens

    def __len__(self) -> int:
        return len(self.chosen)


def _tokenize(pairs: list[Pair], cfg: DpoConfig, tokenizer, source: str) -> PreferencePairs:
    enc = encode(pairs, tokenizer)
    eos = [tokenizer.eos_token_id] if cfg.add_eos else []
    out = PreferencePairs([], [], [], source)
    for prompt, chosen, rejected in zip(enc.prompt_ids, enc.chosen_ids, enc.rejected_ids):
        if cfg.max_prompt_length is not None:
            prompt = prompt[-cfg.max_prompt_length :]  # keep the end of a long prompt: the part next to the answers
        c, r = prompt + chosen + eos, prompt + rejected + eos
        if max(len(c), len(r)) > cfg.max_length:
            out.n_too_long += 1
            continue
        out.chosen.append(c)
        out.rejected.append(r)
        # The first token has no context to be scored in: with no prompt (implicit pairs that differ from the first
        # token) it counts as the prompt.
        out.prompt_lengths.append(max(1, len(prompt)))
    return out


def load_pairs(cfg: DpoConfig, tokenizer) -> tuple[PreferencePairs, PreferencePairs, Preferences]:
    """(train pairs, held-out pairs, what was read); pairs with a side over `dpo.max_length` tokens are left out and
    counted."""
    prefs = load_preferences(cfg, "dpo", tokenizer)
    train = _tokenize(prefs.train, cfg, tokenizer, cfg.train_split)
    held_out = _tokenize(prefs.held_out, cfg, tokenizer, prefs.held_out_source)
    if not len(train):
        raise UserError(
            f"preference data '{cfg.dataset}': no training pair fits dpo.max_length={cfg.max_length} tokens a side "
            f"({train.n_too_long} left out); raise dpo.max_length"
        )
    return train, held_out, prefs
