"""Reward models: a spec file (reward_models/NAME.yaml) names a text classifier, a Python callable, or several of them
with weights; a RUN/reward directory names a reward model `rlhf reward` learned on the run's merged model (scored by
rlhf.reward_model).

A callable follows TRL's reward-function convention, `f(completions, **kwargs) -> list[float | None]`, where kwargs
hold `prompts`, `completion_ids` and the prompt dataset's other columns, each aligned with `completions`; None means
the reward does not apply to that sample. A callable of one positional argument (not named `completions`) is the older
text-only kind and receives prompt + completion texts.

The policy's text is decoded and re-tokenized with the classifier's own tokenizer, so the reward model need not
share the policy's vocabulary (trl's old PPO required it). The score is the classifier's output for a label chosen by
name: lvwerra/distilbert-imdb's logits[:, 0] is NEGATIVE, and transformers 5 silently ignores `return_all_scores`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from rlhf.config import _describe, read_yaml, resolve_path, shipped_dir
from rlhf.errors import UserError

if TYPE_CHECKING:  # torch loads with a reward model, not with a spec: `rlhf budget` reads specs only
    import torch


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["text-classification", "callable", "adapter", "weighted"] = "text-classification"
    model: str | None = Field(None, description="classifier: hub id, local dir or fixture:NAME")
    adapter: str | None = Field(None, description="adapter: the reward adapter directory `rlhf reward` wrote")
    callable: str | None = Field(
        None,
        description="module:function or path/to/file.py:function (relative to the spec file), "
        "f(completions, **kwargs) -> list[float | None] as TRL's reward functions",
    )
    rewards: list[RewardSpec] | None = Field(
        None, description="weighted: the rewards summed, each with its own weight, each logged on its own"
    )
    weight: float = Field(1.0, description="this reward's weight inside a weighted spec")
    accuracy: bool = Field(
        False, description="report this reward's mean as the task accuracy (0/1 rewards are taken as one anyway)"
    )
    label: str = "POSITIVE"
    score: Literal["logit", "probability"] = "logit"
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_length: int = Field(512, ge=8)
    trust_remote_code: bool = False
    _folder: str | None = PrivateAttr(None)  # the spec file's folder: its relative paths start there


def reward_models_dir() -> Path:
    return shipped_dir("reward_models")


def available_rewards() -> list[str]:
    return sorted(p.stem for p in reward_models_dir().glob("*.yaml"))


def load_spec(name_or_path: str) -> RewardSpec:
    from rlhf.rl.reward_files import reward_adapter_dir

    adapter = reward_adapter_dir(name_or_path)
    if adapter is not None:  # a reward model learned by `rlhf reward`: it scores on the policy's own base
        return RewardSpec(name=str(name_or_path), type="adapter", adapter=str(adapter))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        shipped = reward_models_dir() / f"{name_or_path}.yaml"
        if "/" in name_or_path or not shipped.is_file():
            raise UserError(
                f"no reward model '{name_or_path}'; available: {', '.join(available_rewards())} "
                f"(or a path to a reward spec YAML, or a RUN/reward directory written by `rlhf reward`)"
            )
        path = shipped
    raw = read_yaml(path, "a reward spec (name:, type:, model:, label: ...)")
    raw.setdefault("name", path.stem)
    folder = path.resolve().parent
    parts = raw["rewards"] if isinstance(raw.get("rewards"), list) else []
    if raw.get("rewards") is not None:
        raw.setdefault("type", "weighted")
    for i, item in enumerate(parts):
        if isinstance(item, dict):
            item.setdefault("name", f"reward_{i}")
            if "callable" in item:
                item.setdefault("type", "callable")
    for item in [raw, *parts]:
        if isinstance(item, dict) and isinstance(item.get("model"), str):  # a classifier beside the spec
            item["model"] = resolve_path(item["model"], folder, Path.cwd())
    try:
        spec = RewardSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e, RewardSpec) for e in exc.errors())
        raise UserError(f"reward spec {path}: {problems}") from None
    for part in [spec, *(spec.rewards or [])]:
        part._folder = str(folder)
    for part in spec.rewards or [spec]:
        _check_part(part, spec, path)
    return spec


def _check_part(part: RewardSpec, spec: RewardSpec, path: Path) -> None:
    """One reward of a spec is complete; a callable given as FILE.py:function is made absolute (the spec's folder)."""
    where = f"reward spec {path}" + (f", reward '{part.name}'" if part is not spec else "")
    if spec.type == "weighted" and not spec.rewards:
        raise UserError(f"{where}: a weighted reward needs 'rewards:', a list of rewards each with a weight")
    if part is not spec and part.type in ("weighted", "adapter"):
        raise UserError(f"{where}: a weighted spec holds classifiers and callables only, not type {part.type}")
    if part.type == "text-classification" and not part.model:
        raise UserError(f"{where}: a text-classification reward needs 'model: HUB_ID|PATH'")
    if part.type == "callable" and not part.callable:
        raise UserError(f"{where}: a callable reward needs 'callable: module:function'")
    if part.type == "callable":
        module, _, func = part.callable.rpartition(":")
        if module.endswith(".py") and not Path(module).expanduser().is_absolute():
            part.callable = f"{(path.parent / module).resolve()}:{func}"


# The keyword arguments every reward function gets; a dataset column of one of these names is not passed on (TRL's
# trainers leave out the columns they pass themselves).
RESERVED = frozenset({"prompts", "completions", "completion_ids"})


@dataclass
class Samples:
    """What a reward may look at, one entry per sample (a prompt sampled G times appears G times)."""

    prompts: list[Any]  # each prompt as the dataset holds it (a string or messages); document prefixes as text
    completions: list[str]  # the decoded responses
    texts: list[str]  # prompt + completion as decoded text: what a text-only scorer reads
    completion_ids: list[list[int]]  # the response tokens that count (before any pad)
    columns: dict[str, list[Any]] = field(default_factory=dict)  # the prompt rows' other columns
    input_ids: torch.Tensor | None = None  # [B, P + R] prompt + response ids, for a reward on the policy's own base
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.completions)

    def conversational(self, i: int) -> bool:
        return isinstance(self.prompts[i], list)

    def completion_arg(self) -> list[Any]:
        """Completions as TRL passes them: strings, or [{"role": "assistant", "content": ...}] after a chat prompt."""
        return [
            [{"role": "assistant", "content": c}] if self.conversational(i) else c
            for i, c in enumerate(self.completions)
        ]

    def describe(self, i: int) -> str:
        prompt = self.prompts[i]
        if isinstance(prompt, list):
            prompt = prompt[-1].get("content", "") if prompt and isinstance(prompt[-1], dict) else prompt
        return f"sample {i} (prompt {_short(prompt)}, completion {_short(self.completions[i])})"


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 4] + "...'"


@dataclass
class Scores:
    scores: torch.Tensor  # [B] fp32, the reward before any transform (a weighted spec: the weighted sum)
    positive: torch.Tensor  # [B] bool: the classifier's top label is the target label (callables: score > 0)
    # A callable's own values by reward name, NaN where it returned None (does not apply): each logged on its own.
    components: dict[str, torch.Tensor] = field(default_factory=dict)


class ClassifierReward:
    """A sequence classifier scoring texts by the logit (or probability) of one named label."""

    def __init__(self, spec: RewardSpec):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf.resolve import resolve_model

        path = resolve_model(spec.model, what="reward model")
        self.spec = spec
        self.device = torch.device(
            "cuda" if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=spec.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), trust_remote_code=spec.trust_remote_code, use_safetensors=True
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        labels = {int(i): str(n) for i, n in self.model.config.id2label.items()}
        matches = [i for i, n in labels.items() if n.upper() == spec.label.upper()]
        if not matches:
            raise UserError(
                f"reward model {spec.model} has no label '{spec.label}'; its labels are: "
                f"{', '.join(labels[i] for i in sorted(labels))} (set label: in {spec.name}.yaml)"
            )
        self.label_index = matches[0]

    def __call__(self, texts: list[str]) -> Scores:
        import torch

        scores, positive = [], []
        for start in range(0, len(texts), self.spec.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.spec.batch_size],
                padding=True,
                truncation=True,
                max_length=self.spec.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**batch).logits.float()
            chosen = logits[:, self.label_index]
            scores.append(chosen if self.spec.score == "logit" else logits.softmax(-1)[:, self.label_index])
            positive.append(logits.argmax(-1) == self.label_index)
        return Scores(torch.cat(scores).cpu(), torch.cat(positive).cpu())

    def score_samples(self, samples: Samples) -> Scores:
        """Prompt + completion; after a chat prompt, the conversation in the classifier's own chat template where it
        has one (as TRL scores conversational samples with a reward model)."""
        texts = list(samples.texts)
        if getattr(self.tokenizer, "chat_template", None):
            for i in range(len(samples)):
                if samples.conversational(i):
                    messages = [*samples.prompts[i], {"role": "assistant", "content": samples.completions[i]}]
                    texts[i] = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self(texts)


def _import_callable(spec: RewardSpec) -> Callable:
    module_name, _, func_name = (spec.callable or "").rpartition(":")
    # A module is looked for beside the spec first, then in the current directory and the installed packages, so a
    # run started in another folder still finds it.
    folders = [f for f in (spec._folder, os.getcwd()) if f and f not in sys.path]
    sys.path[:0] = folders
    try:
        if module_name.endswith(".py"):  # a file (made absolute from the spec's folder): imported by path
            module_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, func_name)
    except (ImportError, AttributeError, ValueError, FileNotFoundError):
        raise UserError(
            f"reward '{spec.name}': cannot import '{spec.callable}'; write it as module:function, importable from the "
            f"spec's folder ({spec._folder}), the current directory or the installed packages, or as "
            f"path/to/file.py:function"
        ) from None
    finally:
        for folder in folders:
            sys.path.remove(folder)


def takes_kwargs(func: Callable) -> bool:
    """TRL's convention (called with keywords: `completions`, `prompts`, ...) rather than the older `f(texts)`: a
    parameter named `completions`, a first parameter named `prompts`, or keyword arguments only."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: TRL's convention, the documented one
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.name == "completions" for p in params) or not positional or positional[0].name == "prompts"


class CallableReward:
    """A Python reward function, `f(completions, **kwargs) -> list[float | None]` (TRL's convention) or `f(texts)`."""

    def __init__(self, spec: RewardSpec):
        self.spec = spec
        self.func: Callable = _import_callable(spec)
        self.trl_style = takes_kwargs(self.func)
        self.label = f"reward function {getattr(self.func, '__qualname__', spec.callable)} ('{spec.name}')"

    def __call__(self, texts: list[str]) -> Scores:
        n = len(texts)
        return self.score_samples(Samples([""] * n, list(texts), list(texts), [[] for _ in texts]))

    def values(self, samples: Samples) -> list[float | None]:
        """The function's values (None: does not apply); a UserError naming the function and the first bad sample."""
        n = len(samples)
        if self.trl_style:
            kwargs = {"prompts": list(samples.prompts), "completion_ids": list(samples.completion_ids),
                      **{k: list(v) for k, v in samples.columns.items()}}  # fmt: skip
            params = inspect.signature(self.func).parameters.values()
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):  # only what it names
                kwargs = {k: v for k, v in kwargs.items() if k in {p.name for p in params}}
            call = lambda: self.func(completions=samples.completion_arg(), **kwargs)  # noqa: E731
        else:
            call = lambda: self.func(list(samples.texts))  # noqa: E731
        try:
            out = call()
        except UserError:
            raise
        except Exception as exc:
            first = samples.describe(0) if n else "no samples"
            raise UserError(
                f"{self.label} raised {type(exc).__name__}: {str(exc)[:200]} on a batch of {n}, whose first is "
                f"{first}; fix the function (run with --debug for its traceback)"
            ) from exc
        try:
            out = list(out)
        except TypeError:
            raise UserError(
                f"{self.label} returned {type(out).__name__}, not a list; return one float (or None) per completion"
            ) from None
        if len(out) != n:
            raise UserError(
                f"{self.label} returned {len(out)} values for {n} completions; return exactly one float (or None "
                f"where it does not apply) per completion"
            )
        values = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
                continue
            if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # a 0-d tensor or numpy scalar
                v = v.item()
            if not isinstance(v, numbers.Real):
                raise UserError(
                    f"{self.label} returned {_short(v)} ({type(v).__name__}) for {samples.describe(i)}; return a "
                    f"float, or None where the reward does not apply"
                )
            # An older f(texts) reward's NaN/inf is left to the non-finite guard, which skips the batch, as before.
            if not math.isfinite(float(v)) and self.trl_style:
                raise UserError(
                    f"{self.label} returned {float(v)} for {samples.describe(i)}; return a finite float, or None "
                    f"where the reward does not apply"
                )
            values.append(float(v))
        return values

    def score_samples(self, samples: Samples) -> Scores:
        import torch

        values = self.values(samples)
        # A reward that does not apply adds nothing (TRL's nansum); an older reward's NaN stays for the guard.
        total = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float32)
        # A task reward's own values, for its accuracy and its columns; an older text scorer is logged as before.
        components = {self.spec.name: _with_nan(values)} if self.trl_style else {}
        return Scores(total, total > 0, components)


def _with_nan(values: list[float | None]) -> torch.Tensor:
    import torch

    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)


class WeightedReward:
    """Several rewards in one spec: the score is the weighted sum of those that apply to a sample (TRL's nansum of
    reward_weights x rewards); each reward's own values are kept for its own columns in the logs."""

    def __init__(self, spec: RewardSpec):
        self.spec = spec
        self.parts = [
            (part, CallableReward(part) if part.type == "callable" else ClassifierReward(part))
            for part in spec.rewards or []
        ]
        names = [part.name for part, _ in self.parts]
        if len(set(names)) != len(names):
            raise UserError(f"reward spec '{spec.name}': the rewards' names must differ ({', '.join(names)})")

    @property
    def accuracy(self) -> str | None:
        return next((part.name for part, _ in self.parts if part.accuracy), None)

    def score_samples(self, samples: Samples) -> Scores:
        import torch

        components = {}
        total = torch.zeros(len(samples))
        for part, reward in self.parts:
            if isinstance(reward, CallableReward):
                values = _with_nan(reward.values(samples))
            else:
                values = reward.score_samples(samples).scores.float()
            components[part.name] = values
            total += part.weight * torch.nan_to_num(values, nan=0.0)
        return Scores(total, total > 0, components)

    def __call__(self, texts: list[str]) -> Scores:
        n = len(texts)
        return self.score_samples(Samples([""] * n, list(texts), list(texts), [[] for _ in texts]))


def score_samples(reward, samples: Samples) -> Scores:
    """Score with whatever kind of reward: one that reads the samples (callables, classifiers), one on the policy's
    own base that reads the generated ids (rlhf reward), or any object scoring texts."""
    if hasattr(reward, "score_samples"):
        return reward.score_samples(samples)
    if hasattr(reward, "score_tokens") and samples.input_ids is not None:
        return reward.score_tokens(samples.texts, samples.input_ids, samples.attention_mask)
    return reward(samples.texts)


def accuracy_reward(reward) -> str | None:
    """The reward a spec marks as the task accuracy (accuracy: true), if any."""
    if isinstance(reward, WeightedReward):
        return reward.accuracy
    if isinstance(reward, CallableReward) and reward.spec.accuracy:
        return reward.spec.name
    return None


class Judged:
    """A reward whose score comes from one reward and whose `positive` from another, the judge: a learned reward's
    own score > 0 says only "better than the typical answer", while a classifier judges the property itself."""

    def __init__(self, reward, judge: ClassifierReward | CallableReward):
        self.reward, self.judge = reward, judge

    def __call__(self, texts: list[str]) -> Scores:
        return Scores(self.reward(texts).scores, self.judge(texts).positive)

    def score_samples(self, samples: Samples) -> Scores:
        scored = score_samples(self.reward, samples)
        return Scores(scored.scores, score_samples(self.judge, samples).positive, scored.components)


def load_reward(name_or_path: str, device: str | None = None) -> ClassifierReward | CallableReward | WeightedReward:
    """The reward a spec names; `device` (the recipe's reward.device) overrides the spec's (and its parts')."""
    spec = load_spec(name_or_path)
    if device is not None:
        parts = [p.model_copy(update={"device": device}) for p in spec.rewards] if spec.rewards else None
        spec = spec.model_copy(update={"device": device, "rewards": parts})
    if spec.type == "adapter":
        raise UserError(
            f"{name_or_path} is a reward model of `rlhf reward`: it scores only inside `rlhf ppo --reward`, on the "
            f"policy's own weights, so it cannot be a judge; give reward.judge a classifier spec (reward_models/)"
        )
    kinds = {"text-classification": ClassifierReward, "callable": CallableReward, "weighted": WeightedReward}
    return kinds[spec.type](spec)
