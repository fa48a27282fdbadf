"""Preference pairs: loaded like `data.dataset` (hub id, local json/jsonl/csv/parquet, fixture:NAME), checked, and
tokenized with the policy's tokenizer.

Two schemas: `chosen` and `rejected` full texts, or `prompt`, `chosen`, `rejected` where each side is prompt + answer.
With a prompt, prompt and answer are tokenized apart and joined, as PPO joins a prompt's tokens and the generated
ones, so the reward model is trained on ids shaped like those it will score.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import DataConfig, RewardModelConfig
from rlhf.data import load_splits
from rlhf.errors import UserError


@dataclass
class Pairs:
    chosen: list[list[int]]  # token ids of (prompt +) chosen answer
    rejected: list[list[int]]
    source: str  # the split (and rows) they came from, for eval.json
    n_too_long: int = 0  # pairs left out: a side longer than max_length tokens

    def __len__(self) -> int:
        return len(self.chosen)


def _texts(cfg: RewardModelConfig, ds, split: str) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) per row; a missing column or an empty side is a UserError naming it."""
    columns = ds.column_names
    for column, key in ((cfg.chosen_column, "chosen_column"), (cfg.rejected_column, "rejected_column")):
        if column not in columns:
            raise UserError(
                f"preference data '{cfg.dataset}' has no column '{column}'; its columns are: {', '.join(columns)}. "
                f"Preference pairs need `chosen` and `rejected` texts (and optionally `prompt`); "
                f"set reward_model.{key} to the right column"
            )
    prompts = ds[cfg.prompt_column] if cfg.prompt_column in columns else [""] * len(ds)
    rows = list(zip(prompts, ds[cfg.chosen_column], ds[cfg.rejected_column]))
    for i, (prompt, chosen, rejected) in enumerate(rows):
        for value, side in ((prompt, cfg.prompt_column), (chosen, cfg.chosen_column), (rejected, cfg.rejected_column)):
            if value is not None and not isinstance(value, str):
                raise UserError(
                    f"preference data '{cfg.dataset}' split '{split}' row {i}: '{side}' is a {type(value).__name__}, "
                    f"not text; conversational (list of messages) pairs are not supported: give each side as text"
                )
        for value, side in ((chosen, cfg.chosen_column), (rejected, cfg.rejected_column)):
            if value is None or not value.strip():
                raise UserError(
                    f"preference data '{cfg.dataset}' split '{split}' row {i}: the '{side}' side is empty; every pair "
                    f"needs two non-empty answers (fix or remove the row)"
                )
    return [(p or "", c, r) for p, c, r in rows]


def _tokenize(rows: list[tuple[str, str, str]], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Each side's ids, ending with EOS: the score is read there (see `model.sequence_scores`)."""

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    eos = [tokenizer.eos_token_id]
    prompts = encode([p for p, _, _ in rows])
    chosen, rejected = encode([c for _, c, _ in rows]), encode([r for _, _, r in rows])
    return [p + c + eos for p, c in zip(prompts, chosen)], [p + r + eos for p, r in zip(prompts, rejected)]


def load_pairs(cfg: RewardModelConfig, tokenizer) -> tuple[Pairs, Pairs]:
    """(train pairs, held-out pairs). Without the eval split, the last `eval_pairs` of train are held out (said in
    `source`); pairs with a side over `max_length` tokens are left out and counted."""
    splits = load_splits(DataConfig(dataset=cfg.dataset, config_name=cfg.config_name))
    if cfg.train_split not in splits:
        raise UserError(
            f"preference data '{cfg.dataset}' has no split '{cfg.train_split}'; its splits are: {', '.join(splits)} "
            f"(set reward_model.train_split)"
        )
    train = _texts(cfg, splits[cfg.train_split], cfg.train_split)
    if cfg.eval_split in splits and cfg.eval_split != cfg.train_split:
        held_out = _texts(cfg, splits[cfg.eval_split], cfg.eval_split)[: cfg.eval_pairs]
        eval_source = cfg.eval_split
    else:  # no held-out split: the tail of train, which training then never sees
        if len(train) < 2:
            raise UserError(f"preference data '{cfg.dataset}' has {len(train)} pair(s): too few to hold any out")
        n = min(cfg.eval_pairs, len(train) // 2)
        train, held_out = train[:-n], train[-n:]
        eval_source = f"{cfg.train_split} (last {n})"
    if cfg.max_pairs is not None:
        train = train[: cfg.max_pairs]
    out = []
    for rows, source in ((train, cfg.train_split), (held_out, eval_source)):
        chosen, rejected = _tokenize(rows, tokenizer)
        keep = [i for i in range(len(rows)) if max(len(chosen[i]), len(rejected[i])) <= cfg.max_length]
        out.append(Pairs([chosen[i] for i in keep], [rejected[i] for i in keep], source, len(rows) - len(keep)))
    train_pairs, eval_pairs = out
    if not len(train_pairs):
        raise UserError(
            f"preference data '{cfg.dataset}': no training pair fits reward_model.max_length={cfg.max_length} tokens "
            f"a side ({train_pairs.n_too_long} left out); raise reward_model.max_length"
        )
    return train_pairs, eval_pairs
