"""`rlhf report`: RUN/report.md and its plots, from what the steps left in the run directory.

Reads recipe.yaml, sft/metrics.jsonl, reward/ (a learned reward model: metrics.jsonl, eval.json), dpo/ (the same and
its judged generations), and metrics.jsonl and eval.json of ppo/ and of grpo/ (the critic-free step, same keys) when
the run has them; whatever is missing (a run that has only done SFT) is skipped and the report says so.
Writes sft_loss.png, reward_model.png, dpo.png, ppo_reward.png, ppo_kl.png (grpo_*.png for GRPO) beside report.md,
each file atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any

from rlhf.config import Recipe
from rlhf.diversity import collapse_warning
from rlhf.errors import UserError
from rlhf.io import atomic_write_bytes, atomic_write_text, read_jsonl
from rlhf.runs import Run

FIGSIZE = (7.0, 4.0)
DPI = 110
MAX_CELL_CHARS = 400
# Steps that tune the policy after merge; each leaves metrics.jsonl and eval.json (same keys) in its directory.
POLICY_STEPS = {"ppo": "PPO", "grpo": "GRPO"}
# Every step that evaluates generations with the same eval.json keys: the RL steps and DPO (with dpo.judge).
LABELS = {**POLICY_STEPS, "dpo": "DPO"}


def sft_loss_hint(loss: float, vocab_size: int | None) -> str | None:
    """A hint when an SFT loss is above ln(vocabulary), the loss of a uniform guess over the tokens: a model that
    has trained a few steps and still does worse than guessing is fed something else than it learns from."""
    if not vocab_size or not math.isfinite(loss) or loss <= math.log(vocab_size):
        return None
    return (
        f"SFT loss {loss:.2f} is above ln(vocabulary) = {math.log(vocab_size):.2f}, a uniform guess over "
        f"{vocab_size:,} tokens: check that the tokenizer is the model's, that the text column holds text, and that "
        f"sft.learning_rate is not too high"
    )


def _vocab_size(run: Run) -> int | None:
    """The model's vocabulary, from the merged model or the SFT adapter's base (a local directory)."""
    base = (_read_json(run.sft_adapter / "adapter_config.json") or {}).get("base_model_name_or_path")
    for folder in (run.merged, Path(base) if isinstance(base, str) else None):
        config = _read_json(folder / "config.json") if folder else None
        size = (config or {}).get("vocab_size") or (config or {}).get("text_config", {}).get("vocab_size")
        if isinstance(size, int):
            return size
    return None


# --- plots ------------------------------------------------------------------------------------------------------


def _figure(nrows: int = 1, height: float = FIGSIZE[1]):
    """A figure outside pyplot: no global backend switch (a notebook calling this keeps its inline plots), no leak."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return fig, axes


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())  # temp file beside it, then os.replace


def _marker(n: int) -> str | None:
    return "o" if n <= 40 else None  # a short run has a handful of points: show each one


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_sft_loss(rows: list[dict], path: Path) -> bool:
    steps, loss = _series(rows, "loss")
    if not steps:
        return False
    fig, (ax,) = _figure()
    ax.plot(steps, loss, color="tab:blue", marker=_marker(len(steps)), label="training loss (logged steps)")
    ax.set_title("SFT: training loss per optimizer step")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    lr_steps, lr = _series(rows, "lr")
    if lr_steps:
        twin = ax.twinx()
        twin.plot(lr_steps, lr, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        twin.set_ylabel("learning rate", color="tab:gray")
        twin.tick_params(axis="y", colors="tab:gray")
        twin.set_ylim(bottom=0)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    else:
        ax.legend(loc="upper right")
    _save(fig, path)
    return True


def plot_reward(rows: list[dict], path: Path, reward_name: str = "reward model", label: str = "PPO") -> bool:
    rows = [r for r in rows if isinstance(r.get("reward_mean"), (int, float)) and "step" in r]
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    low = [r["reward_mean"] - float(r.get("reward_std", 0.0)) for r in rows]
    high = [r["reward_mean"] + float(r.get("reward_std", 0.0)) for r in rows]
    fig, (top, bottom) = _figure(nrows=2, height=5.0)
    top.plot(steps, mean, color="tab:green", marker=_marker(len(steps)), label="mean reward of the batch")
    top.fill_between(steps, low, high, color="tab:green", alpha=0.2, label="± 1 std over the batch")
    top.set_title(f"{label}: reward per step ({reward_name})")
    top.set_ylabel("reward (score)")
    top.legend(loc="best", fontsize="small")
    pos_steps, pos = _series(rows, "positive_rate")
    if pos_steps:
        bottom.plot(pos_steps, pos, color="tab:purple", marker=_marker(len(pos_steps)), label="positive rate")
        bottom.set_ylim(-0.02, 1.02)
        bottom.legend(loc="best", fontsize="small")
    else:
        bottom.text(0.5, 0.5, "no positive_rate in metrics", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_ylabel("positive rate\n(fraction of batch)")
    bottom.set_xlabel(f"{label} step (one batch of prompts)")
    _save(fig, path)
    return True


def plot_kl(rows: list[dict], path: Path, target_kl: float | None = None, label: str = "PPO") -> bool:
    steps, kl = _series(rows, "kl")
    if not steps:
        return False
    fig, (top, bottom) = _figure(nrows=2, height=5.0)
    top.plot(steps, kl, color="tab:red", marker=_marker(len(steps)), label="KL(policy ‖ reference), batch mean")
    top.axhline(0.0, color="black", linewidth=0.8)
    if target_kl is not None:  # the adaptive controller raises β above this KL and lowers it below
        top.axhline(target_kl, color="tab:gray", linestyle="--", linewidth=1, label=f"target KL ({target_kl:g})")
    top.set_title(f"{label}: KL to the reference model and the KL coefficient")
    top.set_ylabel("KL (nats/response)")
    top.legend(loc="best", fontsize="small")
    coef_steps, coef = _series(rows, "kl_coef")
    if coef_steps:
        bottom.plot(coef_steps, coef, color="tab:orange", marker=_marker(len(coef_steps)), label="KL coefficient β")
        bottom.legend(loc="best", fontsize="small")
        bottom.ticklabel_format(axis="y", useOffset=False)  # an adaptive β moves in the 4th digit: show real values
    bottom.set_ylabel("β (penalty per nat)")
    bottom.set_xlabel(f"{label} step (one batch of prompts)")
    _save(fig, path)
    return True


def plot_reward_model(
    rows: list[dict], path: Path, title: str = "Reward model", accuracy: str = "chosen scored higher"
) -> bool:
    steps, loss = _series(rows, "loss")
    if not steps:
        return False
    fig, (top, bottom) = _figure(nrows=2, height=5.0)
    top.plot(steps, loss, color="tab:blue", marker=_marker(len(steps)), label="pairwise loss of the step's pairs")
    top.axhline(0.6931, color="tab:gray", linestyle="--", linewidth=1, label="log 2 (no preference learned)")
    top.set_title(f"{title}: loss and accuracy per optimizer step (training pairs)")
    top.set_ylabel("loss (nats/pair)")
    top.legend(loc="best", fontsize="small")
    acc_steps, acc = _series(rows, "accuracy")
    bottom.plot(acc_steps, acc, color="tab:purple", marker=_marker(len(acc_steps)), label=accuracy)
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_ylabel("pairwise accuracy")
    bottom.set_xlabel("optimizer step")
    bottom.legend(loc="best", fontsize="small")
    _save(fig, path)
    return True


# --- markdown helpers ----------------------------------------------------------------------------------------------


def md_cell(value: Any) -> str:
    """Text safe inside one markdown table cell: pipes escaped, newlines as <br>, HTML kept literal."""
    text = str(value)
    if len(text) > MAX_CELL_CHARS:
        text = text[:MAX_CELL_CHARS] + "…"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
    return text.strip() or "(empty)"


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if _is_num(value) else "—"


def _delta(before: Any, after: Any, fmt: str) -> str:
    return format(after - before, fmt) if _is_num(before) and _is_num(after) else ""


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- sections -----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _step_recipes(run: Run, steps: list[str]) -> dict[str, Recipe]:
    """Each step's own resolved settings (RUN/STEP/recipe.yaml; RUN/recipe.yaml for a run older than those files):
    RUN/recipe.yaml is rewritten by every step, so only a step's own file says which reward it used."""
    out = {}
    for step in steps:
        try:
            out[step] = run.load_recipe(step)
        except UserError:
            continue
    return out


def _recipe_section(
    run: Run, steps: list[str], evals: dict[str, dict | None]
) -> tuple[list[str], Recipe | None, dict[str, Recipe]]:
    """Lines naming the recipe, model, data, the reward of each step and the settings of each of `steps`; the recipe
    and each step's own, when they can be read."""
    if not run.recipe_path.is_file():
        return ["- recipe: unknown (no recipe.yaml in the run)"], None, {}
    try:
        recipe = run.load_recipe()
    except UserError as exc:  # a damaged recipe should not hide the curves and samples that are there
        return [f"- recipe: unreadable ({exc})"], None, {}
    own = _step_recipes(run, [s for s in steps if (run.root / s).is_dir()])
    held_out = [f"{POLICY_STEPS[s]}: `{ev['eval_split']}`" for s, ev in evals.items() if ev and ev.get("eval_split")]
    held_out_text = ", ".join(held_out) if held_out else f"split `{recipe.data.eval_split}` when the data has one"
    rewards = [(POLICY_STEPS[s], r.reward) for s, r in own.items()] or [(None, recipe.reward)]
    reward_lines = [
        f"- reward{f' ({label})' if label else ''}: `{reward.name}`"
        + (f" (positive rate judged by `{reward.judge}`)" if reward.judge else "")
        for label, reward in rewards
    ]
    ppo = own.get("ppo", recipe).ppo
    kl = f"KL coefficient {ppo.init_kl_coef:g}" + (f" adapted towards KL {ppo.target_kl:g}" if ppo.adaptive_kl else "")
    return [
        f"- recipe: **{recipe.name}**" + (f" — {recipe.description}" if recipe.description else ""),
        f"- model: `{recipe.model.name}` ({recipe.model.quantization}); SFT LoRA r={recipe.lora.rank}, "
        f"alpha={recipe.lora.alpha:g} on {_sft_targets(run, recipe)}",
        f"- data: `{recipe.data.dataset}` (train split `{recipe.data.train_split}`; held out: {held_out_text})",
        *reward_lines,
        *(
            [f"- PPO: batch {ppo.batch_size}, mini-batch {ppo.mini_batch_size}, {ppo.ppo_epochs} PPO epochs, "
             f"learning rate {ppo.learning_rate:g}, {kl}"] if "ppo" in steps else []
        ),
        *([_grpo_line(own.get("grpo", recipe))] if "grpo" in steps else []),
    ], recipe, own  # fmt: skip


def _grpo_line(recipe: Recipe) -> str:
    g = recipe.grpo
    return (
        f"- GRPO: {g.batch_size} prompts x {g.group_size} samples, {g.advantage} advantages, mini-batch "
        f"{g.mini_batch_size}, {g.epochs} epochs, learning rate {g.learning_rate:g}, KL coefficient {g.beta:g} in the "
        f"{g.kl_in}"
    )


def _sft_targets(run: Run, recipe: Recipe) -> str:
    """The layers the SFT adapter adapts, as peft saved them; the recipe's setting when there is no adapter yet."""
    saved = (_read_json(run.sft_adapter / "adapter_config.json") or {}).get("target_modules")
    if isinstance(saved, list):
        return ", ".join(sorted(saved))
    chosen = recipe.lora.target_modules
    return chosen if isinstance(chosen, str) else ", ".join(chosen)


# (row label, eval.json key without _before/_after, format): reward and KL, then whether the responses stayed varied
# and fluent — reward can rise while every prompt gets the same template.
EVAL_ROWS = [
    ("reward (mean score)", "reward", ".3f"),
    ("positive rate", "positive_rate", ".2f"),
    ("KL to reference (nats/response)", "kl", ".3f"),
    ("distinct-1 of responses (unique words / words)", "distinct_1", ".3f"),
    ("distinct-2 of responses (unique word pairs / pairs)", "distinct_2", ".3f"),
    ("responses repeating a word pair (share)", "repetition", ".2f"),
    ("reference-model perplexity of responses", "response_perplexity", ".2f"),
    ("perplexity on held-out text", "perplexity", ".2f"),
]


def _task_rows(ev: dict) -> list[tuple[str, str]]:
    """(row label, eval.json key without _before/_after) of a task reward: its accuracy, sampled and greedy, then each
    reward of the spec on its own, sampled and greedy."""
    rows = []
    # Only a task reward names its accuracy: DPO's eval.json also has accuracy_* (of its held-out pairs), a row of
    # its own pairs section.
    if "accuracy_before" in ev and ev.get("accuracy_reward"):
        rows += [(f"accuracy (`{ev['accuracy_reward']}`, sampled)", "accuracy"),
                 (f"accuracy (`{ev['accuracy_reward']}`, greedy)", "accuracy_greedy")]  # fmt: skip
    for key in ev:
        # reward_NAME_before: one reward of a spec; reward_before (the total) and reward_greedy_before are rows above
        name = key.removeprefix("reward_").removesuffix("_before")
        if key.startswith("reward_") and key.endswith("_before") and name not in ("", "before", "greedy"):
            kind = "greedy" if name.endswith("_greedy") else "sampled"
            rows.append((f"reward `{name.removesuffix('_greedy')}` ({kind})", f"reward_{name}"))
    return rows


def _eval_section(ev: dict | None, step: str = "ppo") -> list[str]:
    label = LABELS[step]
    out = [f"## {label} evaluation on held-out prompts", ""]
    if not ev:
        return out + [f"_No {label} evaluation yet ({step}/eval.json is missing): run `rlhf {step}` to get one._", ""]
    rows = []
    for name, key, fmt in EVAL_ROWS:
        before, after = ev.get(f"{key}_before"), ev.get(f"{key}_after")
        if before is None and after is None:  # a metric this run did not record (an older run): no row of dashes
            continue
        rows.append([name, _num(before, fmt), _num(after, fmt), _delta(before, after, "+" + fmt)])
    for name, key in _task_rows(ev):
        before, after = ev.get(f"{key}_before"), ev.get(f"{key}_after")
        rows.append([name, _num(before, ".3f"), _num(after, ".3f"), _delta(before, after, "+.3f")])
    rows.append(["prompts", str(ev.get("n_prompts", "—")), str(ev.get("n_prompts", "—")), ""])
    out.append(_table(["metric", f"before {label}", f"after {label}", "change"], rows, ["---", "---:", "---:", "---:"]))
    out += _perplexity_warnings(ev, step)
    d2_before, d2_after = ev.get("distinct_2_before"), ev.get("distinct_2_after")
    if _is_num(d2_before) and _is_num(d2_after) and (warning := collapse_warning(d2_before, d2_after)):
        out += [
            "",
            f"**Warning: {warning}.** Many prompts now get the same words: the reward gain may be one template "
            "(see the generations below). A stronger KL penalty or fewer steps keeps the policy nearer the reference.",
        ]
    notes = []
    if ev.get("eval_split"):
        notes.append(f"held-out prompts from split `{ev['eval_split']}`")
    if ev.get("steps") is not None:
        notes.append(f"after {ev['steps']} {label} steps")
    if notes:
        out += ["", "_" + "; ".join(notes) + "._"]
    return out + [""]


# A perplexity this many times the reference's (the value before RL) is called out, not left as a bare number.
PERPLEXITY_FLAG = 2.0


def _perplexity_warnings(ev: dict, step: str) -> list[str]:
    label, out = LABELS[step], []
    knob = {"ppo": "ppo.init_kl_coef / ppo.target_kl", "grpo": "grpo.beta", "dpo": "a larger dpo.beta"}[step]
    for key, what in (
        ("response_perplexity", "the reference model's perplexity of the responses"),
        ("perplexity", "the perplexity on held-out text"),
    ):
        before, after = ev.get(f"{key}_before"), ev.get(f"{key}_after")
        if _is_num(before) and _is_num(after) and before > 0 and after >= PERPLEXITY_FLAG * before:
            out += [
                "",
                f"**Warning: {what} rose {before:.2f} -> {after:.2f} ({after / before:.1f}x the reference's).** "
                f"After {label} the text is far less likely under the reference model: often reward hacking or "
                f"broken text (read the generations below). A stronger KL penalty ({knob}) or fewer steps keeps the "
                f"policy nearer the reference.",
            ]
    return out


# (row label, reward/eval.json key without _before/_after, format)
REWARD_MODEL_ROWS = [
    ("pairwise accuracy (chosen scored higher)", "accuracy", ".3f"),
    ("mean margin (chosen - rejected)", "margin_mean", ".3f"),
    ("mean score, chosen", "chosen_mean", ".3f"),
    ("mean score, rejected", "rejected_mean", ".3f"),
    ("pairwise loss", "loss", ".3f"),
]


def _reward_model_section(run: Run) -> list[str]:
    """`rlhf reward`'s held-out evaluation and training curve; nothing when the run has no learned reward."""
    if not run.reward_dir.is_dir():
        return []
    ev = _read_json(run.reward_dir / "eval.json")
    out = ["## Reward model (rlhf reward) on held-out pairs", ""]
    if not ev:
        out += ["_No evaluation yet (reward/eval.json is missing): run `rlhf reward` to finish training._", ""]
    else:
        rows = [
            [name, _num(ev.get(f"{key}_before"), fmt), _num(ev.get(f"{key}_after"), fmt),
             _delta(ev.get(f"{key}_before"), ev.get(f"{key}_after"), "+" + fmt)]
            for name, key, fmt in REWARD_MODEL_ROWS
            if f"{key}_before" in ev or f"{key}_after" in ev
        ]  # fmt: skip
        rows.append(["pairs", str(ev.get("n_pairs", "—")), str(ev.get("n_pairs", "—")), ""])
        header = ["metric", "before training", "after training", "change"]
        out += [_table(header, rows, ["---", "---:", "---:", "---:"]), ""]
        out += [
            f"_Held-out pairs from `{ev.get('eval_split', '?')}`; {ev.get('steps', '?')} steps on "
            f"{ev.get('train_pairs', '?')} training pairs; scores centred on the held-out answers (score > 0: better "
            f"than the typical answer)._",
            "",
        ]
    drawn = plot_reward_model(read_jsonl(run.reward_dir / "metrics.jsonl"), run.root / "reward_model.png")
    return out + _figure_md(
        run,
        "Reward model training",
        "reward_model.png",
        drawn,
        "reward model loss and accuracy per step",
        "no reward model metrics (reward/metrics.jsonl is missing or empty)",
    )


# (row label, dpo/eval.json key without _before/_after, format)
DPO_ROWS = [
    ("preference accuracy (chosen's implicit reward higher)", "accuracy", ".3f"),
    ("mean margin of implicit rewards (chosen - rejected)", "margin_mean", ".3f"),
    ("mean implicit reward, chosen", "chosen_reward", ".3f"),
    ("mean implicit reward, rejected", "rejected_reward", ".3f"),
    ("DPO loss", "loss", ".3f"),
    ("KL proxy on the pairs' answers (k2, nats)", "kl_proxy", ".3f"),
    ("the policy's own ranking (chosen likelier per token)", "likelihood_accuracy", ".3f"),
]


def _dpo_section(run: Run) -> list[str]:
    """`rlhf dpo`'s held-out pairs, its judged generations (PPO's table) and its training curve; nothing when the run
    has no DPO."""
    if not run.dpo_dir.is_dir():
        return []
    ev = _read_json(run.dpo_dir / "eval.json")
    out = ["## DPO (rlhf dpo) on held-out pairs", ""]
    if not ev:
        out += ["_No evaluation yet (dpo/eval.json is missing): run `rlhf dpo` to finish training._", ""]
    else:
        rows = [
            [name, _num(ev.get(f"{key}_before"), fmt), _num(ev.get(f"{key}_after"), fmt),
             _delta(ev.get(f"{key}_before"), ev.get(f"{key}_after"), "+" + fmt)]
            for name, key, fmt in DPO_ROWS
            if f"{key}_before" in ev or f"{key}_after" in ev
        ]  # fmt: skip
        rows.append(["pairs", str(ev.get("n_pairs", "—")), str(ev.get("n_pairs", "—")), ""])
        out += [_table(["metric", "before DPO", "after DPO", "change"], rows, ["---", "---:", "---:", "---:"]), ""]
        out += [
            f"_Held-out pairs from `{ev.get('eval_split', '?')}`; {ev.get('steps', '?')} steps on "
            f"{ev.get('train_pairs', '?')} training pairs, {ev.get('loss_type', '?')} loss, beta "
            f"{ev.get('beta', '?')}{f', label smoothing {ls}' if (ls := ev.get('label_smoothing')) else ''}; "
            f"implicit reward = beta x (log pi - log pi_ref) of the answer, all 0 before training (the policy is the "
            f"reference), so the accuracy starts at 0: ties order nothing._",
            "",
        ]
        if "positive_rate_after" in ev:
            judged = {**ev, "eval_split": ev.get("prompts_split")}
            out += _eval_section(judged, "dpo")[:-1] + [f"_Judged by `{ev.get('judge')}`._", ""]
    drawn = plot_reward_model(
        read_jsonl(run.dpo_dir / "metrics.jsonl"), run.root / "dpo.png", "DPO", "chosen's implicit reward higher"
    )
    out += _figure_md(
        run, "DPO training", "dpo.png", drawn, "DPO loss and accuracy per step",
        "no DPO metrics (dpo/metrics.jsonl is missing or empty)",
    )  # fmt: skip
    if ev and "samples_after" in ev:
        out += _samples_section(ev, "dpo")
    return out


def _figure_md(run: Run, heading: str, name: str, drawn: bool, alt: str, missing: str, intro: str = "") -> list[str]:
    out = [f"### {heading}", ""] + ([intro, ""] if intro else [])
    if drawn:
        return out + [f"![{alt}]({name})", ""]
    (run.root / name).unlink(missing_ok=True)  # a plot left from an earlier state of the run would contradict the text
    return out + [f"_Not drawn: {missing}._", ""]


def _plots_section(
    run: Run,
    sft_rows: list[dict],
    policy_rows: dict[str, list[dict]],
    recipe: Recipe | None,
    own: dict[str, Recipe],
) -> list[str]:
    losses = [r for r in sft_rows if isinstance(r.get("loss"), (int, float))]
    intro = ""
    if losses:
        first, last = losses[0], losses[-1]
        intro = (
            f"Loss {first['loss']:.4f} at step {first.get('step')} -> {last['loss']:.4f} at step "
            f"{last.get('step')} ({len(losses)} logged steps)."
        )
        if hint := sft_loss_hint(last["loss"], _vocab_size(run)):
            intro += f" **{hint}**"
    out = [
        "## Training curves",
        "",
        *_figure_md(
            run,
            "SFT",
            "sft_loss.png",
            plot_sft_loss(sft_rows, run.root / "sft_loss.png"),
            "SFT training loss per step",
            "no SFT metrics (sft/metrics.jsonl is missing or empty)",
            intro,
        ),
    ]
    for step, rows in policy_rows.items():
        label = POLICY_STEPS[step]
        missing = f"no {label} metrics ({step}/metrics.jsonl is missing or empty)"
        # the adaptive controller's target is a PPO setting
        step_recipe = own.get(step, recipe)
        reward_name = step_recipe.reward.name if step_recipe else "reward model"
        target_kl = step_recipe.ppo.target_kl if step == "ppo" and step_recipe and step_recipe.ppo.adaptive_kl else None
        out += [
            *_figure_md(
                run,
                f"{label} reward ({reward_name})",
                f"{step}_reward.png",
                plot_reward(rows, run.root / f"{step}_reward.png", reward_name, label),
                f"{label} reward mean ± std and positive rate per step",
                missing,
            ),
            *_figure_md(
                run,
                f"{label} KL",
                f"{step}_kl.png",
                plot_kl(rows, run.root / f"{step}_kl.png", target_kl, label),
                "KL to the reference and the KL coefficient per step",
                missing,
            ),
        ]
    return out


def _samples_section(ev: dict | None, step: str = "ppo") -> list[str]:
    label = LABELS[step]
    out = [f"## Generations before and after {label}", ""]
    before, after = (ev or {}).get("samples_before") or [], (ev or {}).get("samples_after") or []
    if not before and not after:
        return out + [f"_No samples: {step}/eval.json is missing or holds no samples._", ""]
    out.append(
        f"The same held-out prompts, sampled with the same seed, before and after {label}; reward = the "
        f"{'judge' if step == 'dpo' else 'reward'}'s score of prompt + response."
    )
    out.append("")
    rows = []
    for i in range(max(len(before), len(after))):
        b = before[i] if i < len(before) else {}
        a = after[i] if i < len(after) else {}
        prompt = b.get("prompt", a.get("prompt", ""))
        rows.append(
            [
                str(i + 1),
                md_cell(prompt),
                md_cell(b.get("response", "—")),
                _num(b.get("reward"), "+.2f"),
                md_cell(a.get("response", "—")),
                _num(a.get("reward"), "+.2f"),
            ]
        )
    out.append(
        _table(
            ["#", "prompt", f"before {label}", "reward", f"after {label}", "reward"],
            rows,
            ["---:", "---", "---", "---:", "---", "---:"],
        )
    )
    return out + [""]


def _phases_table(rows: list[dict], label: str) -> list[str]:
    phases = list(dict.fromkeys(k for r in rows for k in r if k.startswith("time_") and k != "time_step"))
    if not phases:
        return []
    n = len(rows)
    total = sum(float(r.get("time_step", 0.0)) for r in rows) / n
    table = []
    for key in phases:
        mean = sum(float(r.get(key, 0.0)) for r in rows) / n
        table.append([key.removeprefix("time_"), f"{mean:.2f}", f"{100 * mean / total:.0f}%" if total > 0 else ""])
    table.append(["whole step", f"{total:.2f}", "100%" if total > 0 else ""])
    return [
        f"### Where a {label} step spends its time",
        "",
        f"Mean over {n} {label} steps.",
        "",
        _table(["phase", "seconds/step", "share"], table, ["---", "---:", "---:"]),
        "",
    ]


def _timings_section(timings: dict[str, float] | None, policy_rows: dict[str, list[dict]]) -> list[str]:
    phases = [line for step, rows in policy_rows.items() for line in _phases_table(rows, POLICY_STEPS[step])]
    if not timings and not phases:
        return []
    out = ["## Timings", ""]
    if timings:
        rows = [[md_cell(k), f"{v:.1f}"] for k, v in timings.items()]
        rows.append(["**total**", f"**{sum(timings.values()):.1f}**"])
        out += [_table(["step", "seconds (wall)"], rows, ["---", "---:"]), ""]
    return out + phases


def _artifacts_section(run: Run, steps: list[str]) -> list[str]:
    items = [
        ("SFT LoRA adapter", run.sft_adapter),
        ("SFT metrics", run.sft_dir / "metrics.jsonl"),
        ("merged model (Hugging Face dir)", run.merged),
    ]
    if run.dpo_dir.is_dir():
        items += [
            ("DPO policy adapter", run.dpo_adapter),
            ("DPO metrics", run.dpo_dir / "metrics.jsonl"),
            ("DPO evaluation", run.dpo_dir / "eval.json"),
            ("DPO checkpoints (resume)", run.dpo_checkpoints),
        ]
    if run.reward_dir.is_dir():
        items += [
            ("reward model adapter + score_head.safetensors", run.reward_adapter),
            ("reward model metrics", run.reward_dir / "metrics.jsonl"),
            ("reward model evaluation", run.reward_dir / "eval.json"),
        ]
    for step in steps:
        label, where = POLICY_STEPS[step], run.root / step
        items += [
            (f"{label} policy adapter" + (" + value_head.safetensors" if step == "ppo" else ""), where / "adapter"),
            (f"{label} metrics", where / "metrics.jsonl"),
            (f"{label} samples during training", where / "samples.jsonl"),
            (f"{label} evaluation", where / "eval.json"),
            (f"{label} checkpoints (resume)", where / "checkpoints"),
        ]
    rows = [[what, f"`{path.relative_to(run.root)}`", "yes" if path.exists() else "not yet"] for what, path in items]
    return [
        "## Artifacts",
        "",
        f"All paths relative to `{run.root}`.",
        "",
        _table(["what", "path", "present"], rows),
        "",
    ]


# --- entry point --------------------------------------------------------------------------------------------------


def write_report(run: Run, timings: dict[str, float] | None = None) -> Path:
    """Write RUN/report.md and the PNG plots beside it; return the path of report.md."""
    sft_rows = read_jsonl(run.sft_dir / "metrics.jsonl")
    # PPO and/or GRPO, whichever the run has; PPO when neither (nor DPO), so the report says how to get one
    steps = [step for step in POLICY_STEPS if (run.root / step).is_dir()] or ([] if run.dpo_dir.is_dir() else ["ppo"])
    policy_rows = {step: read_jsonl(run.root / step / "metrics.jsonl") for step in steps}
    evals = {step: _read_json(run.root / step / "eval.json") for step in steps}
    if not run.recipe_path.is_file() and not sft_rows and not any(policy_rows.values()) and not any(evals.values()):
        raise UserError(f"{run.root} holds no rlhf run (no recipe.yaml, no metrics); nothing to report")

    recipe_lines, recipe, own = _recipe_section(run, steps, evals)
    lines = [
        f"# rlhf run report: {run.root.name}",
        "",
        f"- run directory: `{run.root.resolve()}`",
        f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        *recipe_lines,
        "",
        *_reward_model_section(run),
        *_dpo_section(run),
        *[line for step in steps for line in _eval_section(evals[step], step)],
        *_plots_section(run, sft_rows, policy_rows, recipe, own),
        *[line for step in steps for line in _samples_section(evals[step], step)],
        *_timings_section(timings, policy_rows),
        *_artifacts_section(run, steps),
    ]
    path = run.root / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
