"""Preference pairs for the reward model: read by `rlhf.preferences` (TRL's explicit and implicit forms, chat
messages rendered), then tokenized as TRL does with the policy's tokenizer, each side ending with EOS, where the score
is read (see `model.sequence_scores`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import RewardModelConfig
from rlhf.errors import UserError
from rlhf.preferences import Pair, Preferences, encode, load_preferences


@dataclass
class Pairs:
    chosen: list[list[int]]  # token ids of prompt + chosen answer + EOS
    rejected: list[list[int]]
    source: str  # which pairs these are, for eval.json
    n_too_long: int = 0  # pairs left out: a side longer than max_length tokens

    def __len__(self) -> int:
        return len(self.chosen)


def _tokenize(pairs: list[Pair], tokenizer, max_length: int, source: str) -> Pairs:
    enc = encode(pairs, tokenizer)
    eos = [tokenizer.eos_token_id]
    chosen = [p + c + eos for p, c in zip(enc.prompt_ids, enc.chosen_ids)]
    rejected = [p + r + eos for p, r in zip(enc.prompt_ids, enc.rejected_ids)]
    keep = [i for i in range(len(pairs)) if max(len(chosen[i]), len(rejected[i])) <= max_length]
    return Pairs([chosen[i] for i in keep], [rejected[i] for i in keep], source, len(pairs) - len(keep))


def load_pairs(cfg: RewardModelConfig, tokenizer) -> tuple[Pairs, Pairs, Preferences]:
    """(train pairs, held-out pairs, what was read); pairs with a side over `max_length` tokens are left out and
    counted."""
    prefs = load_preferences(cfg, "reward_model", tokenizer)
    train = _tokenize(prefs.train, tokenizer, cfg.max_length, cfg.train_split)
    held_out = _tokenize(prefs.held_out, tokenizer, cfg.max_length, prefs.held_out_source)
    if not len(train):
        raise UserError(
            f"preference data '{cfg.dataset}': no training pair fits reward_model.max_length={cfg.max_length} tokens "
            f"a side ({train.n_too_long} left out); raise reward_model.max_length"
        )
    return train, held_out, prefs
