"""Preference pairs as TRL defines them, for every step that learns from them (`rlhf reward`, `rlhf dpo`).

Two forms, detected per dataset (trl.data_utils.maybe_extract_prompt, the rule TRL's trainers apply):
- explicit prompt: `prompt` + `chosen` / `rejected` completions;
- implicit prompt: `chosen` / `rejected` hold the whole text, and their longest shared prefix is the prompt.
Each value may be text or a list of `{role, content}` messages; messages are rendered with the tokenizer's chat
template (trl.data_utils.maybe_apply_chat_template), so every pair ends up as three texts, prompt + completion being
exactly what the model reads. `encode` then tokenizes as TRL's DPOTrainer does: the prompt, and prompt + completion
joined as text, the completion starting where the two tokenizations part.

    prefs = load_preferences(recipe.reward_model, "reward_model", tokenizer)
    print(prefs.summary())            # how many pairs, which form, what is held out and why
    for warning in prefs.warnings: ...
    prefs.train, prefs.held_out       # lists of Pair(prompt, chosen, rejected)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import UserError


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str  # the completion alone: the model reads prompt + chosen
    rejected: str


@dataclass
class Preferences:
    train: list[Pair]
    held_out: list[Pair]
    dataset: str
    form: str  # "explicit prompt" or "implicit prompt (shared prefix)", with ", chat messages" when rendered
    held_out_source: str  # short, for eval.json: "test", or "train (last 20)"
    held_out_from: str  # which pairs are held out, and why
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.train) + len(self.held_out)} preference pairs from {self.dataset} ({self.form}): "
            f"{len(self.train)} to train on, {len(self.held_out)} held out ({self.held_out_from})"
        )


@dataclass
class Encoded:
    """Token ids per pair: the model reads prompt_ids + chosen_ids (or + rejected_ids)."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    n_prompt_cut: int = 0  # pairs whose prompt's last tokens merged with the completion's first (TRL's rule)


# --- loading ------------------------------------------------------------------------------------------------------


def _setting(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default)


def load_preferences(cfg: Any, section: str, tokenizer=None) -> Preferences:
    """The pairs of `cfg` (a recipe section with `dataset`, and optionally `config_name`, `train_split`, `eval_split`,
    `prompt_column`, `chosen_column`, `rejected_column`, `max_pairs`, `eval_pairs`), split into train and held-out.

    The held-out pairs are the first `eval_pairs` of the eval split when the data has one; else the last `eval_pairs`
    of train, at most half of them. `section` names the recipe section in messages (reward_model, dpo)."""
    from rlhf.config import DataConfig
    from rlhf.data import load_splits

    dataset = cfg.dataset
    train_split = _setting(cfg, "train_split", "train")
    eval_split = _setting(cfg, "eval_split", "test")
    eval_pairs = _setting(cfg, "eval_pairs", 500)
    splits = load_splits(
        DataConfig(dataset=dataset, config_name=_setting(cfg, "config_name", None)), setting=f"{section}.dataset"
    )
    if train_split not in splits:
        raise UserError(
            f"preference data '{dataset}' has no split '{train_split}'; its splits are: {', '.join(splits)} "
            f"(set {section}.train_split)"
        )
    warnings: list[str] = []
    train, form = _pairs(cfg, section, splits[train_split], train_split, tokenizer, warnings)
    if eval_split in splits and eval_split != train_split:
        rows, _ = _pairs(cfg, section, splits[eval_split], eval_split, tokenizer, warnings)
        held_out = rows[:eval_pairs]
        source = eval_split
        held_out_from = (
            f"the first {len(held_out)} of the {len(rows)} in split '{eval_split}'; {section}.eval_pairs sets how many"
        )
    else:  # no held-out split: the tail of train, which training then never sees
        if len(train) < 2:
            raise UserError(
                f"preference data '{dataset}' has {len(train)} pair(s) and no '{eval_split}' split: too few to hold "
                f"any out for evaluation; add pairs, or a '{eval_split}' split ({section}.eval_split)"
            )
        n = min(eval_pairs, len(train) // 2)
        train, held_out = train[:-n], train[-n:]
        source = f"{train_split} (last {n})"
        capped = "at most half; " if n < eval_pairs else ""
        held_out_from = (
            f"the last {n} of '{train_split}', as there is no '{eval_split}' split; {capped}"
            f"{section}.eval_pairs sets how many, {section}.eval_split names a split"
        )
    max_pairs = _setting(cfg, "max_pairs", None)
    if max_pairs is not None:
        train = train[:max_pairs]
    return Preferences(train, held_out, dataset, form, source, held_out_from, warnings)


def _check_value(value: Any, where: str, column: str) -> None:
    if isinstance(value, str):
        return
    messages = isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)
    if messages and value:
        return
    shown = "empty" if value in (None, []) else f"a {type(value).__name__}"
    raise UserError(
        f"{where}: '{column}' is {shown}, not text or a list of {{role, content}} messages; fix or remove the row"
    )


def _pairs(cfg: Any, section: str, ds, split: str, tokenizer, warnings: list[str]) -> tuple[list[Pair], str]:
    """Every row of one split as a Pair, and the form detected; a missing column or an unusable value is a UserError
    naming the row and the setting to change."""
    from trl.data_utils import is_conversational, maybe_extract_prompt

    dataset = cfg.dataset
    columns = ds.column_names
    prompt_col = _setting(cfg, "prompt_column", "prompt")
    chosen_col = _setting(cfg, "chosen_column", "chosen")
    rejected_col = _setting(cfg, "rejected_column", "rejected")
    for column, key in ((chosen_col, "chosen_column"), (rejected_col, "rejected_column")):
        if column not in columns:
            raise UserError(
                f"preference data '{dataset}' has no column '{column}'; its columns are: {', '.join(columns)}. "
                f"Preference pairs need `chosen` and `rejected` (and optionally `prompt`); set {section}.{key} to "
                f"the right column"
            )
    explicit = prompt_col in columns
    prompts = ds[prompt_col] if explicit else [None] * len(ds)
    same = {i for i, (c, r) in enumerate(zip(ds[chosen_col], ds[rejected_col])) if c and c == r}
    if same and not _setting(cfg, "skip_identical_pairs", False):
        # A pair with nothing to prefer teaches nothing (its loss is log 2 whatever the model does) and usually means a
        # column mix-up, so it is refused rather than dropped in silence; dropping is one setting away.
        raise UserError(
            f"preference data '{dataset}' split '{split}' row {min(same)}: chosen and rejected are the same answer "
            f"({len(same)} of {len(ds)} rows), so there is nothing to prefer; remove those rows, or set "
            f"{section}.skip_identical_pairs=true to leave them out"
        )
    pairs, n_repeat, n_repeat_long, n_glued, chat = [], 0, 0, 0, False
    for i, (prompt, chosen, rejected) in enumerate(zip(prompts, ds[chosen_col], ds[rejected_col])):
        where = f"preference data '{dataset}' split '{split}' row {i}"
        for value, column in ((chosen, chosen_col), (rejected, rejected_col)):
            _check_value(value, where, column)
            if isinstance(value, str) and not value.strip():
                raise UserError(
                    f"{where}: the '{column}' side is empty; every pair needs two non-empty answers (fix or remove "
                    f"the row)"
                )
        if explicit:
            _check_value(prompt, where, prompt_col)
        example = {"chosen": chosen, "rejected": rejected} | ({"prompt": prompt} if explicit else {})
        if i in same:  # skip_identical_pairs (else refused above)
            continue
        repeats = explicit and _repeats(prompt, chosen, rejected)
        n_repeat += repeats
        n_repeat_long += repeats and (not isinstance(prompt, str) or len(prompt.split()) >= 3)
        example = maybe_extract_prompt(example)  # implicit: the shared prefix becomes the prompt
        if is_conversational(example):
            chat = True
            example = _render(example, tokenizer, where)
        elif isinstance(example["prompt"], list) or any(isinstance(example[k], list) for k in ("chosen", "rejected")):
            raise UserError(
                f"{where}: the prompt and the answers mix text and lists of messages; give all of them one way"
            )
        pair = Pair(example["prompt"], example["chosen"], example["rejected"])
        n_glued += not repeats and (_glued(pair.prompt, pair.chosen) or _glued(pair.prompt, pair.rejected))
        pairs.append(pair)
    n = len(ds)
    if same:
        warnings.append(
            f"{len(same)} of {n} pairs in split '{split}' have chosen == rejected and are left out "
            f"({section}.skip_identical_pairs)"
        )
    # A prompt of two words ("It is") can begin an answer by chance; a long one, or many pairs, is the mistake.
    if n_repeat_long or n_repeat >= 0.05 * n:
        warnings.append(
            f"{n_repeat} of {n} pairs in split '{split}' have completions that begin with their prompt, so the model "
            f"reads the prompt twice: with a '{prompt_col}' column, '{chosen_col}' and '{rejected_col}' hold the "
            f"answer alone (or drop the '{prompt_col}' column: the shared prefix is then the prompt)"
        )
    if n_glued:
        warnings.append(
            f"{n_glued} of {n} pairs in split '{split}' join prompt and answer with no space between two words (e.g. "
            f"'It was' + 'great' reads 'It wasgreat'); the text is joined as given, as TRL does: start the answers "
            f"with a space"
        )
    if not pairs:
        identical = f", {len(same)} of them with the same chosen and rejected answer" if same else ""
        raise UserError(f"preference data '{dataset}' split '{split}' has no usable pair ({n} rows{identical})")
    form = "explicit prompt" if explicit else "implicit prompt (the shared prefix of chosen and rejected)"
    return pairs, form + (", chat messages rendered with the chat template" if chat else "")


def _repeats(prompt: Any, chosen: Any, rejected: Any) -> bool:
    """The completions start with the prompt again (text), or with its messages (chat)."""
    if isinstance(prompt, str):
        head = prompt.strip()
        return bool(head) and all(isinstance(s, str) and s.lstrip().startswith(head) for s in (chosen, rejected))
    if isinstance(prompt, list):
        return all(isinstance(s, list) and s[: len(prompt)] == prompt for s in (chosen, rejected))
    return False


def _glued(prompt: str, completion: str) -> bool:
    """Two words run together at the join: neither side has whitespace there, and both sides are letters/digits."""
    return bool(prompt) and bool(re.search(r"\w$", prompt)) and bool(re.match(r"\w", completion))


def _render(example: dict, tokenizer, where: str) -> dict:
    from trl.data_utils import maybe_apply_chat_template

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}: the pairs are chat messages, but the model's tokenizer has no chat template to render them; "
            f"set model.chat_template (chatml, a .jinja file, or the template text), or give the pairs as text"
        )
    if isinstance(example["prompt"], str) or not example["prompt"]:
        raise UserError(f"{where}: chat pairs need a prompt of at least one message (a user turn) before the answers")
    try:
        return maybe_apply_chat_template(example, tokenizer)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{where}: cannot render the messages with the chat template ({exc})") from None


# --- tokenizing ---------------------------------------------------------------------------------------------------


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode(pairs: list[Pair], tokenizer) -> Encoded:
    """Token ids of each pair as TRL's DPOTrainer makes them: tokenize the prompt, and prompt + completion as one text
    (so the join tokenizes as the model would read it); the completion begins where the two part. No special tokens
    are added: a chat template writes its own, and plain text has none to add."""

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    prompts = ids([p.prompt for p in pairs])
    full_chosen = ids([p.prompt + p.chosen for p in pairs])
    full_rejected = ids([p.prompt + p.rejected for p in pairs])
    out = Encoded([], [], [])
    for prompt, chosen, rejected in zip(prompts, full_chosen, full_rejected):
        n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        out.n_prompt_cut += n < len(prompt)
        out.prompt_ids.append(prompt[:n])
        out.chosen_ids.append(chosen[n:])
        out.rejected_ids.append(rejected[n:])
    return out
