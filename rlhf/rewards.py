"""Reward models: a spec file (reward_models/NAME.yaml) names a text classifier or a Python callable; a RUN/reward
directory names a reward model `rlhf reward` learned on the run's merged model (scored by rlhf.reward_model).

The policy's text is decoded and re-tokenized with the classifier's own tokenizer, so the reward model need not
share the policy's vocabulary (trl's old PPO required it). The score is the classifier's output for a label chosen by
name: lvwerra/distilbert-imdb's logits[:, 0] is NEGATIVE, and transformers 5 silently ignores `return_all_scores`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from rlhf.config import _describe, read_yaml, resolve_path, shipped_dir
from rlhf.errors import UserError

if TYPE_CHECKING:  # torch loads with a reward model, not with a spec: `rlhf budget` reads specs only
    import torch


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["text-classification", "callable", "adapter"] = "text-classification"
    model: str | None = Field(None, description="classifier: hub id, local dir or fixture:NAME")
    adapter: str | None = Field(None, description="adapter: the reward adapter directory `rlhf reward` wrote")
    callable: str | None = Field(None, description="module:function taking list[str] and returning list[float]")
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
    if isinstance(raw.get("model"), str):  # a classifier directory next to the spec, wherever rlhf is started
        raw["model"] = resolve_path(raw["model"], folder, Path.cwd())
    try:
        spec = RewardSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e, RewardSpec) for e in exc.errors())
        raise UserError(f"reward spec {path}: {problems}") from None
    spec._folder = str(folder)
    if spec.type == "text-classification" and not spec.model:
        raise UserError(f"reward spec {path}: a text-classification reward needs 'model: HUB_ID|PATH'")
    if spec.type == "callable" and not spec.callable:
        raise UserError(f"reward spec {path}: a callable reward needs 'callable: module:function'")
    return spec


@dataclass
class Scores:
    scores: torch.Tensor  # [B] fp32, the reward before any transform
    positive: torch.Tensor  # [B] bool: the classifier's top label is the target label (callables: score > 0)


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


class CallableReward:
    """`module:function(texts) -> list[float]`: any Python scorer."""

    def __init__(self, spec: RewardSpec):
        module_name, _, func_name = (spec.callable or "").partition(":")
        # The module is looked for beside the spec first, then in the current directory and the installed packages,
        # so a run started in another folder still finds it.
        folders = [f for f in (spec._folder, os.getcwd()) if f and f not in sys.path]
        sys.path[:0] = folders
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError, ValueError):
            raise UserError(
                f"reward '{spec.name}': cannot import '{spec.callable}'; write it as module:function, importable "
                f"from the spec's folder ({spec._folder}), the current directory or the installed packages"
            ) from None
        finally:
            for folder in folders:
                sys.path.remove(folder)
        self.func: Callable[[list[str]], list[float]] = func

    def __call__(self, texts: list[str]) -> Scores:
        import torch

        values = torch.tensor([float(v) for v in self.func(list(texts))], dtype=torch.float32)
        if values.shape != (len(texts),):
            raise UserError(f"reward callable returned {values.numel()} scores for {len(texts)} texts")
        return Scores(values, values > 0)


class Judged:
    """A reward whose score comes from one reward and whose `positive` from another, the judge: a learned reward's
    own score > 0 says only "better than the typical answer", while a classifier judges the property itself."""

    def __init__(self, reward, judge: ClassifierReward | CallableReward):
        self.reward, self.judge = reward, judge

    def __call__(self, texts: list[str]) -> Scores:
        return Scores(self.reward(texts).scores, self.judge(texts).positive)

    def score_tokens(self, texts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Scores:
        if hasattr(self.reward, "score_tokens"):
            scores = self.reward.score_tokens(texts, input_ids, attention_mask).scores
        else:
            scores = self.reward(texts).scores
        return Scores(scores, self.judge(texts).positive)


def load_reward(name_or_path: str, device: str | None = None) -> ClassifierReward | CallableReward:
    """The reward a spec names; `device` (the recipe's reward.device) overrides the spec's."""
    spec = load_spec(name_or_path)
    if device is not None:
        spec = spec.model_copy(update={"device": device})
    if spec.type == "adapter":
        raise UserError(
            f"{name_or_path} is a reward model of `rlhf reward`: it scores only inside `rlhf ppo --reward`, on the "
            f"policy's own weights, so it cannot be a judge; give reward.judge a classifier spec (reward_models/)"
        )
    return ClassifierReward(spec) if spec.type == "text-classification" else CallableReward(spec)
