"""What would make a step fit: the changes that shrink it, each re-estimated and ranked (`suggest`), and the largest
micro-batch that fits, the effective batch kept (`auto_fit`, for --auto-fit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf.budget.device import resolve_device
from rlhf.budget.lengths import DataLengths
from rlhf.budget.peak import Estimate, estimate
from rlhf.config import Recipe


@dataclass(frozen=True)
class Change:
    key: str  # a dotted recipe key: the change is pasted as KEY=VALUE
    value: Any
    cost: int  # 1 slower only, 2 nearly the same results, 3 trains on something different, 4 a weaker base
    why: str

    def __str__(self) -> str:
        value = str(self.value).lower() if isinstance(self.value, bool) else self.value
        return f"{self.key}={value}"


@dataclass
class Suggestion:
    changes: tuple[Change, ...]
    total_bytes: int
    fits: bool

    @property
    def cost(self) -> int:
        return max(c.cost for c in self.changes)

    @property
    def text(self) -> str:
        return " ".join(str(c) for c in self.changes)


def _set(recipe: Recipe, key: str, value: Any) -> Recipe:
    """recipe with the dotted `key` set (nested model_copy, no other field touched)."""
    head, _, rest = key.partition(".")
    if not rest:
        return recipe.model_copy(update={head: value})
    return recipe.model_copy(update={head: _set(getattr(recipe, head), rest, value)})


def apply_changes(recipe: Recipe, spec: dict | None, changes: tuple[Change, ...]) -> tuple[Recipe, dict | None]:
    for change in changes:
        recipe = _set(recipe, change.key, change.value)
    return recipe, spec


def _divisors(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def _reestimate(est: Estimate, changes: tuple[Change, ...]) -> Estimate:
    recipe, spec = apply_changes(est.recipe, est.reward_spec, changes)
    return estimate(
        recipe,
        est.step,
        est.device_bytes,
        spec,
        device_kind=est.device_kind,
        device_description=est.device,
        lengths=est.lengths,
    )


def _first_fitting(est: Estimate, base: tuple[Change, ...], options: list[tuple[Change, ...]]) -> tuple[Change, ...]:
    """The mildest of `options` that fits together with `base`; else the strongest (the most memory saved)."""
    for changes in options:
        if _reestimate(est, base + changes).fits:
            return changes
    return options[-1]


EIGHT_BIT_ADAM = "8-bit optimizer states: nearly the same results"
MIN_NEW_TOKENS = 4  # shorter responses than this say too little for a reward to judge: never suggested
# A change that does not make the step fit is suggested at its mildest option that saves this share of what its
# strongest would: rollout_batch_size=1 saves hardly more than 8 and makes generation many times slower.
USEFUL_SHARE = 0.9


def _knobs(est: Estimate) -> list[list[tuple[Change, ...]]]:
    """What can shrink the step: each knob a list of options (tuples of edits that belong together), mildest first."""
    recipe, knobs = est.recipe, []
    if est.step == "sft":
        cfg = recipe.sft
        if not cfg.gradient_checkpointing:
            knobs.append([(Change("sft.gradient_checkpointing", True, 1, "~30% slower steps, same training"),)])
        effective = cfg.batch_size * cfg.gradient_accumulation_steps
        knobs.append(
            [
                (
                    Change("sft.batch_size", b, 1, "smaller micro-batches, same effective batch: slower"),
                    Change("sft.gradient_accumulation_steps", effective // b, 1, ""),
                )
                for b in _divisors(effective)
                if b < cfg.batch_size
            ]
        )
        if cfg.optimizer == "adamw":
            knobs.append([(Change("sft.optimizer", "adamw_8bit", 2, EIGHT_BIT_ADAM),)])
        knobs.append(
            [
                (Change("sft.block_size", b, 3, "shorter training blocks: less context per example"),)
                for b in (cfg.block_size // 2**k for k in range(1, 8))
                if b >= 64
            ]
        )
    elif est.step in ("reward", "dpo"):
        section = {"reward": "reward_model", "dpo": "dpo"}[est.step]
        cfg = getattr(recipe, section)
        if not cfg.gradient_checkpointing:
            knobs.append([(Change(f"{section}.gradient_checkpointing", True, 1, "~30% slower steps, same training"),)])
        effective = cfg.batch_size * cfg.gradient_accumulation_steps
        knobs.append(
            [
                (
                    Change(f"{section}.batch_size", b, 1, "fewer pairs a micro-batch, same effective batch: slower"),
                    Change(f"{section}.gradient_accumulation_steps", effective // b, 1, ""),
                )
                for b in _divisors(effective)
                if b < cfg.batch_size
            ]
        )
        if cfg.optimizer == "adamw":
            knobs.append([(Change(f"{section}.optimizer", "adamw_8bit", 2, EIGHT_BIT_ADAM),)])
        knobs.append(
            [
                (Change(f"{section}.max_length", n, 3, "longer pairs are left out of training"),)
                for n in (cfg.max_length // 2**k for k in range(1, 6))
                if n >= 64
            ]
        )
    elif est.step in ("ppo", "grpo"):
        step = est.step
        cfg = getattr(recipe, step)
        gen = cfg.generation
        sequences = cfg.batch_size * getattr(cfg, "group_size", 1)  # generated per step
        spec = est.reward_spec or {}
        if spec.get("model") and spec.get("device", "auto") != "cpu" and est.device_kind == "cuda":
            why = f"the reward classifier ({recipe.reward.name}) on the CPU: slower scoring"
            knobs.append([(Change("reward.device", "cpu", 1, why),)])
        if not cfg.gradient_checkpointing:
            knobs.append([(Change(f"{step}.gradient_checkpointing", True, 1, "~30% slower updates, same training"),)])
        micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
        knobs.append(
            [
                (
                    Change(
                        f"{step}.gradient_accumulation_steps",
                        cfg.mini_batch_size // m,
                        1,
                        "smaller micro-batches, same mini-batch: slower updates",
                    ),
                )
                for m in _divisors(cfg.mini_batch_size)
                if m < micro
            ]
        )
        knobs.append(
            [
                (Change(f"{step}.rollout_batch_size", r, 1, "generate and score fewer sequences at once: slower"),)
                for r in _divisors(sequences)
                if r < min(cfg.rollout_batch_size, sequences)
            ]
        )
        if cfg.optimizer == "adam":
            knobs.append([(Change(f"{step}.optimizer", "adam_8bit", 2, EIGHT_BIT_ADAM),)])
        knobs.append(
            [
                (Change(f"{step}.generation.max_new_tokens", n, 3, "shorter responses"),)
                + ((Change(f"{step}.generation.min_new_tokens", n, 3, ""),) if gen.min_new_tokens > n else ())
                for n in (gen.max_new_tokens // 2**k for k in range(1, 6))
                if n >= MIN_NEW_TOKENS
            ]
        )
    else:
        return []
    if recipe.model.quantization != "4bit":
        knobs.append([(Change("model.quantization", "4bit", 4, "NF4 base (QLoRA): some quality loss"),)])
    return [knob for knob in knobs if knob]


def _cost(changes: tuple[Change, ...]) -> int:
    return max(c.cost for c in changes)


def suggest(est: Estimate) -> list[Suggestion]:
    """Changes that shrink the step, each re-estimated and ranked.

    Those that make it fit come first, cheapest first (1 slower only ... 4 a weaker base), then smallest: single
    changes, and the cheapest set of changes that fits together when it is cheaper than any single one. Then the
    single changes that help but are not enough, by what they save.
    """
    if est.recipe is None or est.step == "merge":
        return []
    knobs = _knobs(est)
    singles = []
    for knob in knobs:
        new_by = [(changes, _reestimate(est, changes)) for changes in knob]
        fit = next(((c, n) for c, n in new_by if n.fits), None)
        if fit is None:  # not enough alone: the mildest option that saves nearly all its strongest would
            least = new_by[-1][1].total_bytes
            enough = est.total_bytes - USEFUL_SHARE * (est.total_bytes - least)
            fit = next((c, n) for c, n in new_by if n.total_bytes <= enough)
        changes, new = fit
        if new.total_bytes < est.total_bytes:
            singles.append(Suggestion(changes, new.total_bytes, new.fits))
    fitting = [s for s in singles if s.fits]
    together = _combine(est, knobs)
    if together and (not fitting or together.cost < min(s.cost for s in fitting)):
        fitting.append(together)
    fitting.sort(key=lambda s: (s.cost, s.total_bytes))
    return fitting + sorted((s for s in singles if not s.fits), key=lambda s: s.total_bytes)


def _combine(est: Estimate, knobs: list[list[tuple[Change, ...]]]) -> Suggestion | None:
    """The cheapest knobs at their strongest until it fits; then drop the knobs it fits without (dearest first) and
    set each remaining one back to its mildest option that still fits."""
    knobs = sorted(knobs, key=lambda k: _cost(k[-1]))
    chosen: list[int] = []
    for n in range(len(knobs)):
        chosen.append(n)
        if _reestimate(est, sum((knobs[k][-1] for k in chosen), ())).fits:
            break
    else:
        return None
    setting = {k: knobs[k][-1] for k in chosen}
    for k in sorted(chosen, key=lambda k: -_cost(knobs[k][-1])):
        without = sum((v for j, v in setting.items() if j != k), ())
        if _reestimate(est, without).fits:
            del setting[k]
    for k in sorted(setting):
        others = sum((v for j, v in setting.items() if j != k), ())
        setting[k] = _first_fitting(est, others, knobs[k])
    changes = sum((setting[k] for k in sorted(setting)), ())
    if len(setting) < 2:
        return None  # a single change: already among the singles
    new = _reestimate(est, changes)
    return Suggestion(changes, new.total_bytes, new.fits)


def auto_fit(recipe: Recipe, step: str, gpu: str | None, lengths: DataLengths | None = None) -> Recipe:
    """The recipe with the largest micro-batch that fits, the effective batch kept by gradient accumulation.

    sft, reward, dpo: batch_size x gradient_accumulation_steps of the section stays the same. ppo and grpo:
    mini_batch_size (the sequences per optimizer step) stays; its micro-batch (mini_batch_size /
    gradient_accumulation_steps) is chosen, and when generation is what does not fit, rollout_batch_size is lowered
    too. Nothing fits: the smallest settings (the pre-flight then says so).
    """
    device = resolve_device(gpu, recipe)

    def fits(candidate: Recipe) -> bool:
        return estimate(candidate, step, device.bytes, device_kind=device.kind, lengths=lengths).fits

    if step == "sft":
        effective = recipe.sft.batch_size * recipe.sft.gradient_accumulation_steps
        options = [
            recipe.model_copy(
                update={
                    "sft": recipe.sft.model_copy(
                        update={"batch_size": b, "gradient_accumulation_steps": effective // b}
                    )
                }
            )
            for b in _divisors(effective)
        ]
    elif step in ("ppo", "grpo"):
        cfg = getattr(recipe, step)
        sequences = cfg.batch_size * getattr(cfg, "group_size", 1)

        def with_(micro: int, rollout: int) -> Recipe:
            update = {"gradient_accumulation_steps": cfg.mini_batch_size // micro, "rollout_batch_size": rollout}
            return recipe.model_copy(update={step: cfg.model_copy(update=update)})

        micros = _divisors(cfg.mini_batch_size)
        rollouts = [r for r in _divisors(sequences) if r <= cfg.rollout_batch_size] or [sequences]
        # The update's micro-batch first (with the smallest rollout), then the largest rollout batch beside it.
        micro = next((m for m in micros if fits(with_(m, rollouts[-1]))), micros[-1])
        options = [with_(micro, r) for r in rollouts]
    elif step in ("reward", "dpo"):
        section = {"reward": "reward_model", "dpo": "dpo"}[step]
        cfg = getattr(recipe, section)
        effective = cfg.batch_size * cfg.gradient_accumulation_steps
        options = [
            recipe.model_copy(
                update={
                    section: cfg.model_copy(update={"batch_size": b, "gradient_accumulation_steps": effective // b})
                }
            )
            for b in _divisors(effective)
        ]
    else:
        return recipe
    return next((candidate for candidate in options if fits(candidate)), options[-1])
