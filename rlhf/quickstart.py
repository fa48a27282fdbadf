"""`rlhf quickstart`: the whole flow on the embedded offline default, through exactly the code of the real commands.

fixtures -> sft -> merge -> ppo (or, with --algo grpo|dpo, grpo or dpo) with its evaluation before and after ->
report, each step printing its memory budget first. Tiny stand-ins for gpt-neox-20b, IMDB and distilbert-imdb make it
run on a laptop CPU in minutes.

With `--reward-model` the reward is learned first: `rlhf reward` on fixture:imdb-preferences (LoRA + score head on
the merged model), then the RL step on that adapter, scored on the policy's own weights; the sentiment classifier then
only judges `positive` (reward.judge), an independent check that the learned reward taught what the pairs meant.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rlhf.config import load_recipe
from rlhf.errors import UserError
from rlhf.runs import Run, new_run_dir

REAL_FLOW = """\
The same flow on gpt-neox-20b with a 24 GB GPU (check the fit first):
  rlhf budget --model gpt-neox-20b --gpu 24GiB
  rlhf sft --model gpt-neox-20b
  rlhf merge
  {step}"""


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", file=sys.stderr, flush=True)


STEP_BANNER = {
    "ppo": "rlhf ppo --reward quickstart-sentiment (second LoRA + value head, reference = adapter disabled)",
    "grpo": "rlhf grpo --reward quickstart-sentiment (second LoRA, groups of samples per prompt, no value head)",
    "dpo": "rlhf dpo --dataset fixture:imdb-preferences (second LoRA on preference pairs, reference = adapter "
    "disabled; quickstart-sentiment only judges generations before and after)",
}


TASKS = ("arithmetic",)
TASK_FLOW = """\
The same flow on your own task (a prompt/completion dataset with the column your reward checks; README, "Your own
task"):
  rlhf sft --recipe my-task.yaml
  rlhf merge
  rlhf {algo} --reward my-reward.yaml"""


def main(
    run_dir: str | None = None,
    force: bool = False,
    algo: str | None = None,
    reward_model: bool = False,
    task: str | None = None,
) -> int:
    if task is not None:
        if reward_model or algo == "dpo":
            raise UserError(
                "--reward-model and --algo dpo belong to the sentiment quickstart; --task runs grpo or ppo on the "
                "task's own reward"
            )
        return main_task(task, run_dir, force, algo or "grpo")
    algo = algo or "ppo"
    from rlhf import merge, report, sft
    from rlhf.dpo import step as dpo
    from rlhf.fixtures import ensure_fixtures
    from rlhf.grpo import step as grpo
    from rlhf.ppo import step as ppo
    from rlhf.reward_model import step as reward_step

    started = time.time()
    recipe = load_recipe("quickstart")
    run = Run(Path(run_dir)) if run_dir else new_run_dir(recipe)
    if run.recipe_path.exists() and not force:
        raise UserError(f"{run.root} already holds a run; pass another --run, or --force to redo the quickstart in it")
    timings: dict[str, float] = {}

    _banner("1/5 offline fixtures: synthetic IMDB, tiny GPT-NeoX, tiny DistilBERT classifier, preference pairs")
    t = time.time()
    paths = ensure_fixtures()
    timings["fixtures"] = time.time() - t
    print(f"fixtures ready in {timings['fixtures']:.0f}s under {paths.imdb.parent}", file=sys.stderr)

    _banner("2/5 rlhf sft --recipe quickstart (8-bit base + LoRA)")
    t = time.time()
    sft.run(recipe, run, force=force)
    timings["sft"] = time.time() - t

    _banner("3/5 rlhf merge (fp16, streamed shard by shard, self-checked)")
    t = time.time()
    merge.run(str(run.root), force=force)
    timings["merge"] = time.time() - t

    reward_eval = None
    if reward_model and algo == "dpo":
        raise UserError("--reward-model goes with --algo ppo or grpo: DPO learns from the pairs without a reward model")
    if reward_model:
        _banner("4a/5 rlhf reward --dataset fixture:imdb-preferences (reward LoRA + score head on the merged model)")
        t = time.time()
        reward_eval = reward_step.run(recipe, run, force=force).eval
        timings["reward"] = time.time() - t
        _banner(
            f"4b/5 rlhf {algo} --reward {run.reward_dir} reward.judge=quickstart-sentiment (the learned reward, "
            "scored on the policy's weights; the classifier judges the positive rate)"
        )
        reward, judged = str(run.reward_dir), recipe.reward.model_copy(update={"judge": "quickstart-sentiment"})
        recipe = recipe.model_copy(update={"reward": judged})
    else:
        _banner(f"4/5 {STEP_BANNER[algo]}")
        reward = "quickstart-sentiment"
    t = time.time()
    if algo == "dpo":
        result = dpo.run(recipe, run, force=force)
    else:
        result = {"ppo": ppo, "grpo": grpo}[algo].run(recipe, run, reward=reward, force=force)
    timings[algo] = time.time() - t

    _banner("5/5 report")
    t = time.time()
    report_path = report.write_report(run, timings)
    timings["report"] = time.time() - t
    total = time.time() - started

    ev = result.eval
    print(f"\nquickstart done in {total:.0f}s wall ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    if reward_eval:
        print(
            f"  reward model   held-out accuracy {reward_eval['accuracy_before']:.2f} -> "
            f"{reward_eval['accuracy_after']:.2f} ({reward_eval['n_pairs']} pairs)"
        )
    if algo == "dpo":
        print(
            f"  DPO            held-out preference accuracy {ev['accuracy_before']:.2f} -> {ev['accuracy_after']:.2f}, "
            f"margin {ev['margin_mean_before']:+.2f} -> {ev['margin_mean_after']:+.2f} ({ev['n_pairs']} pairs)"
        )
    if ev.get("reward_after") is not None:
        print(f"  reward         {ev['reward_before']:+.3f} -> {ev['reward_after']:+.3f}")
        print(
            f"  positive rate  {ev['positive_rate_before']:.2f} -> {ev['positive_rate_after']:.2f}"
            f"  ({ev['n_prompts']} held-out prompts"
            f"{', judged by quickstart-sentiment' if reward_model or algo == 'dpo' else ''})"
        )
        print(f"  distinct-2     {ev['distinct_2_before']:.2f} -> {ev['distinct_2_after']:.2f}")
        print(
            f"  KL to reference {ev['kl_after']:.2f} nats; perplexity {ev['perplexity_before']:.2f} -> "
            f"{ev['perplexity_after']:.2f}"
        )
    print(
        f"  artifacts: {run.root}/ (sft/adapter, merged/, {'reward/adapter, ' if reward_model else ''}{algo}/adapter, "
        f"{algo}/eval.json)"
    )
    print(f"  report:    {report_path}")
    step = "rlhf dpo --dataset Anthropic/hh-rlhf" if algo == "dpo" else f"rlhf {algo} --reward imdb-sentiment"
    print(REAL_FLOW.format(step=step))
    return 0


def main_task(task: str, run_dir: str | None, force: bool, algo: str) -> int:
    """`rlhf quickstart --task arithmetic`: SFT on the task's prompt/completion pairs (loss on the completion), merge,
    then GRPO (or PPO) on a reward that checks each completion against its row's answer, and the held-out accuracy
    before and after."""
    from rlhf import merge, report, sft
    from rlhf.fixtures import resolve_fixture
    from rlhf.grpo import step as grpo
    from rlhf.ppo import step as ppo

    if task not in TASKS:
        raise UserError(f"no task '{task}'; the offline tasks are: {', '.join(TASKS)}")
    started = time.time()
    recipe = load_recipe(task)
    run = Run(Path(run_dir)) if run_dir else new_run_dir(recipe)
    if run.recipe_path.exists() and not force:
        raise UserError(f"{run.root} already holds a run; pass another --run, or --force to redo the quickstart in it")
    timings: dict[str, float] = {}

    _banner("1/5 offline fixtures: sums in words (prompt, completion, answer), a tiny GPT-NeoX that has seen equations")
    t = time.time()
    data, policy = resolve_fixture(recipe.data.dataset), resolve_fixture(recipe.model.name)
    timings["fixtures"] = time.time() - t
    print(f"fixtures ready in {timings['fixtures']:.0f}s: {data}, {policy}", file=sys.stderr)

    _banner(f"2/5 rlhf sft --recipe {task} (prompt/completion pairs, the loss on the completion only)")
    t = time.time()
    sft.run(recipe, run, force=force)
    timings["sft"] = time.time() - t

    _banner("3/5 rlhf merge (fp16, streamed shard by shard, self-checked)")
    t = time.time()
    merge.run(str(run.root), force=force)
    timings["merge"] = time.time() - t

    _banner(
        f"4/5 rlhf {algo} --reward {recipe.reward.name} (1.0 when the completion's first number is the row's answer)"
    )
    t = time.time()
    result = {"ppo": ppo, "grpo": grpo}[algo].run(recipe, run, reward=recipe.reward.name, force=force)
    timings[algo] = time.time() - t

    _banner("5/5 report")
    t = time.time()
    report_path = report.write_report(run, timings)
    timings["report"] = time.time() - t
    total = time.time() - started

    ev = result.eval or {}
    print(f"\nquickstart done in {total:.0f}s wall ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    if "accuracy_before" in ev:
        print(
            f"  held-out accuracy  {ev['accuracy_before']:.2f} -> {ev['accuracy_after']:.2f} sampled, "
            f"{ev['accuracy_greedy_before']:.2f} -> {ev['accuracy_greedy_after']:.2f} greedy "
            f"({ev['n_prompts']} test prompts, never trained on)"
        )
    print(f"  artifacts: {run.root}/ (sft/adapter, merged/, {algo}/adapter, {algo}/eval.json)")
    print(f"  report:    {report_path}")
    print(TASK_FLOW.format(algo=algo))
    return 0
