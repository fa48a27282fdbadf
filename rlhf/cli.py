"""The `rlhf` command: parse, dispatch, and turn failures into one clear line and an exit code.

Exit codes: 0 done; 1 a bug or a failed self-check; 2 a mistake in the input (the line says how to fix it);
3 the memory budget says the step does not fit (the report says what would); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from rlhf.errors import DoesNotFit, UserError

EPILOG_OVERRIDES = (
    "KEY=VALUE overrides any recipe field by its dotted path, e.g. lora.rank=8 ppo.mini_batch_size=8 "
    "sft.max_steps=100. An unknown key is an error that lists the valid keys."
)


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line, like every other user error."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _add_recipe(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--recipe",
        metavar="NAME|PATH",
        default=default,
        help="a shipped recipe (gpt-neox-20b, llama-3.1-8b, qwen2.5-14b, quickstart, memorize) or a YAML file"
        + (f"; default {default}" if default else ""),
    )


def _add_gpu(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu",
        metavar="NAME|SIZE",
        help="memory to plan against: a card (rtx3060, rtx4060ti-16gb, rtx4070tisuper, rtx4080, rtx3090, rtx4090, "
        "rtx5090, a10, a10g, l4, t4, a100-40, a100-80, h100; spaces, case and the rtx are optional: '4090') or a "
        "size such as 24GiB or 512MiB; default: the recipe's budget.gpu, else the detected GPU's free memory, else "
        "free RAM (a CPU run)",
    )


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", metavar="DIR", help="run directory (default: a new one under runs/ for sft, else runs/latest)"
    )
    _add_gpu(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument(
        "--force", action="store_true", help="go on although the budget says it will not fit; redo a finished step"
    )
    p.add_argument(
        "--auto-fit", action="store_true", help="pick the largest micro-batch that fits; keep the effective batch"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lora.rank=8")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rlhf",
        description="RLHF-tune a large language model on one GPU: sft -> merge -> ppo (or grpo), with a memory budget "
        "first.",
        epilog="Start with `rlhf quickstart` (offline, minutes on a CPU). Exit codes: 2 bad input, 3 does not fit.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("sft", help="step 1: LoRA fine-tune a quantized base on text", epilog=EPILOG_OVERRIDES)
    _add_recipe(p)
    p.add_argument(
        "--model", metavar="ALIAS|HUB_ID|PATH", help="a recipe alias (gpt-neox-20b), a hub id or a local dir"
    )
    p.add_argument(
        "--dataset", metavar="HUB_ID|PATH", help="a hub dataset, or a local json/jsonl/csv/parquet/txt file or dir"
    )
    _add_common_train(p)

    p = sub.add_parser("merge", help="step 2: merge the SFT adapter into the fp16 base, shard by shard")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/latest)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], help="dtype of the merged model (default: the recipe's)")
    p.add_argument("--adapters", nargs="+", metavar="DIR", help="combine several LoRA adapters instead of the run's")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per adapter")
    p.add_argument(
        "--method", default="linear", choices=["linear", "cat", "ties", "dare_ties"], help="how to combine adapters"
    )
    p.add_argument(
        "--base-weights",
        choices=["original", "dequantized"],
        help="merge into the original weights, or (after a 4-bit sft) into the NF4-dequantized ones the adapter was "
        "trained on (default: the recipe's merge.base_weights)",
    )
    p.add_argument("--force", action="store_true", help="merge again although merged/ exists; ignore the RAM check")

    p = sub.add_parser("ppo", help="step 3: PPO on the merged model with a reward model", epilog=EPILOG_OVERRIDES)
    _add_recipe(p)
    p.add_argument(
        "--reward",
        metavar="NAME|PATH|RUN/reward",
        help="a reward_models/NAME.yaml, a path to one, or a reward model `rlhf reward` wrote (RUN/reward: scored "
        "with its adapter on the policy's own weights); default: the recipe's",
    )
    _add_common_train(p)

    p = sub.add_parser(
        "grpo",
        help="step 3, critic-free: GRPO or RLOO on the merged model, no value head",
        description="Critic-free RL after `rlhf merge`: each prompt is sampled grpo.group_size times and each sample's "
        "advantage is its reward against the others of its group (grpo.advantage=grpo|rloo); the reference is the "
        "merged model with the adapter off, its KL in the loss or the reward (grpo.kl_in, grpo.beta).",
        epilog=EPILOG_OVERRIDES,
    )
    _add_recipe(p)
    p.add_argument(
        "--reward", metavar="NAME|PATH", help="a reward_models/NAME.yaml or a path to one (default: the recipe's)"
    )
    _add_common_train(p)

    p = sub.add_parser(
        "reward",
        help="learn a reward model from preference pairs: LoRA + score head on the merged model (before ppo)",
        epilog=EPILOG_OVERRIDES + " The recipe section is reward_model (e.g. reward_model.max_steps=200).",
    )
    _add_recipe(p)
    p.add_argument(
        "--dataset",
        dest="preference_dataset",
        metavar="HUB_ID|PATH",
        help="preference pairs (columns chosen, rejected; optionally prompt): a hub dataset, a local "
        "json/jsonl/csv/parquet file or dir, or fixture:imdb-preferences (default: the recipe's reward_model.dataset)",
    )
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/latest)")
    _add_gpu(p)
    p.add_argument("--resume", action="store_true", help="continue from the reward model's last checkpoint")
    p.add_argument(
        "--force", action="store_true", help="go on although the budget says it will not fit; train it again"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. reward_model.max_steps=50")

    p = sub.add_parser(
        "dpo",
        help="after merge: DPO on preference pairs, a new LoRA on the merged model (no reward model, no sampling)",
        description="Direct preference optimisation after `rlhf merge`: a new LoRA on the run's merged k-bit model, "
        "the reference the same model with that adapter disabled, the pairs as `rlhf reward` reads them (chosen, "
        "rejected, optionally prompt). Writes RUN/dpo/ (adapter, checkpoints, metrics.jsonl, eval.json).",
        epilog=EPILOG_OVERRIDES + " The recipe section is dpo (e.g. dpo.beta=0.1 dpo.loss_type=ipo dpo.max_steps=200).",
    )
    _add_recipe(p)
    p.add_argument(
        "--dataset",
        dest="preference_dataset",
        metavar="HUB_ID|PATH",
        help="preference pairs (columns chosen, rejected; optionally prompt): a hub dataset, a local "
        "json/jsonl/csv/parquet file or dir, or fixture:imdb-preferences (default: the recipe's dpo.dataset)",
    )
    _add_common_train(p)

    p = sub.add_parser(
        "budget",
        help="predict memory, component by component, and say whether it fits",
        description="Predict each step's peak memory from the model's shape alone (no weights loaded) and say whether "
        "it fits, with the cheapest changes that would make it fit as KEY=VALUE overrides to paste.",
        epilog="Exit codes: 0 every step asked for fits; 3 a step does not fit (the table, or the JSON's "
        '"suggestions", says what would); 2 bad input. --json prints one object per step: the components, '
        '"peak_moment", "device_kind" (cuda: a GPU; cpu: RAM) and "suggestions".',
    )
    _add_recipe(p)
    p.add_argument("--model", metavar="ALIAS|HUB_ID|PATH", help="a recipe alias, a hub id or a local dir")
    p.add_argument(
        "--step",
        default="all",
        choices=["sft", "merge", "reward", "ppo", "grpo", "dpo", "all"],
        help="which step (default all)",
    )
    _add_gpu(p)
    p.add_argument("--json", action="store_true", help="print JSON for programs instead of the table")
    p.add_argument(
        "--list",
        action="store_true",
        help="list the models whose shapes ship with rlhf (no hub needed); with --gpu, which of them fit that card "
        "for --step and at which settings",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")

    p = sub.add_parser("preview", help="show the first training examples exactly as the model will see them")
    _add_recipe(p)
    p.add_argument("--model", metavar="ALIAS|HUB_ID|PATH", help="a recipe alias, a hub id or a local dir")
    p.add_argument("--dataset", metavar="HUB_ID|PATH", help="dataset to preview")
    p.add_argument("-n", type=_positive_int, default=3, metavar="N", help="number of examples (default 3)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")

    p = sub.add_parser(
        "quickstart", help="the whole flow offline on tiny models: budget, sft, merge, ppo (or grpo), eval, report"
    )
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/quickstart-<time>)")
    p.add_argument(
        "--algo",
        choices=["ppo", "grpo", "dpo"],
        help="step 3: ppo (value head), grpo (critic-free) or dpo (preference pairs, no reward model in the loop); "
        "default ppo, with --task grpo",
    )
    p.add_argument("--force", action="store_true", help="reuse a run directory that holds a quickstart run")
    p.add_argument(
        "--reward-model",
        action="store_true",
        help="learn the reward from preference pairs first (rlhf reward), then PPO on it; the sentiment classifier "
        "only judges the positive rate",
    )
    p.add_argument(
        "--task",
        choices=["arithmetic"],
        help="a task instead of the sentiment demo: arithmetic (sums in words; SFT on prompt/completion, then RL on a "
        "reward that checks the answer, held-out accuracy before and after)",
    )

    p = sub.add_parser("report", help="write RUN/report.md and its plots for a run")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/latest)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argparse, with KEY=VALUE overrides allowed anywhere (`rlhf ppo a=1 --resume b=2`): plain argparse takes the
    positionals once and calls the ones after a flag unrecognized."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if any(item.startswith("-") for item in extra) or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    return args


def resolve_recipe(args: argparse.Namespace, default: str | None = None):
    """The recipe named by --recipe or --model (an alias is a recipe of that name), with --model/--dataset applied."""
    from rlhf.config import find_recipe, load_recipe

    overrides = list(getattr(args, "overrides", None) or [])
    name = args.recipe
    model = getattr(args, "model", None)
    if model and not name and find_recipe(model) is not None and not Path(model).exists():
        name, model = model, None
    if model:
        if model.endswith((".yaml", ".yml")):
            raise UserError(f"--model {model} looks like a recipe file; pass it as --recipe {model}")
        _check_model_name(model)
        overrides.insert(0, f"model.name={model}")
    dataset = getattr(args, "dataset", None)
    if dataset:
        overrides.insert(0, f"data.dataset={dataset}")
    if model and name is None and not any(o.startswith("model.dtype=") for o in overrides):
        if dtype := _checkpoint_dtype(model):
            overrides.insert(0, f"model.dtype={dtype}")
    if name is None and model is None:
        name = default
    # Quote values so a hub id or a path is never re-typed by YAML (e.g. a name like 1e5).
    return load_recipe(name, [_quote_first_class(o) for o in overrides])


def _checkpoint_dtype(model: str) -> str | None:
    """The dtype a model's config.json records (a bf16 checkpoint is run in bf16, not the default fp16); None when
    the config cannot be had here or records none that rlhf runs in."""
    from rlhf.budget.shapes import find_config

    try:
        config = json.loads(find_config(model).read_text())
    except (UserError, OSError, ValueError):
        return None
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")
    return dtype if dtype in ("float16", "bfloat16", "float32") else None


def _check_model_name(model: str) -> None:
    """A bare name (no org/) that is no recipe alias, no local path and not cached is a typo when the hub is offline:
    say which aliases exist rather than what a hub lookup could not find."""
    from rlhf.config import available_recipes
    from rlhf.resolve import is_fixture

    if "/" in model or is_fixture(model) or Path(model).expanduser().exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise UserError(
            f"--model {model} is not a recipe alias ({', '.join(available_recipes())}), not a local directory, and "
            f"the hub is offline (HF_HUB_OFFLINE=1), so it cannot be a hub id here either; pass an alias or a local "
            f"model directory"
        )


def _quote_first_class(item: str) -> str:
    key, _, value = item.partition("=")
    if key in ("model.name", "data.dataset"):
        return f"{key}={value!r}" if not value.startswith(("'", '"')) else item
    return item


def cmd_sft(args) -> int:
    from rlhf import budget, sft
    from rlhf.runs import Run, check_writable, new_run_dir

    recipe = resolve_recipe(args)
    if args.auto_fit:
        from rlhf.budget.lengths import scan

        recipe = budget.auto_fit(recipe, "sft", args.gpu, lengths=scan(recipe, "sft")[0])
    if not args.run and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("with several processes (accelerate launch), pass --run DIR so that all of them use one run")
    run = Run(Path(args.run)) if args.run else new_run_dir(recipe)
    check_writable(run.root)

    def attempt(recipe, retry: bool) -> None:
        # A retry continues from a checkpoint when there is one; else it starts over in the directory it just made.
        resume = args.resume or (retry and sft.last_checkpoint(run) is not None)
        sft.run(recipe, run, resume=resume, force=args.force or (retry and not resume), gpu=args.gpu)

    _retry_on_oom("sft", recipe, args, attempt)
    return 0


def cmd_merge(args) -> int:
    from rlhf import merge

    if args.weights and not args.adapters:
        raise UserError("--weights goes with --adapters A B ...: one weight per adapter")
    result = merge.run(
        args.run,
        dtype=args.dtype,
        force=args.force,
        adapters=args.adapters,
        weights=args.weights,
        method=args.method,
        base_weights=args.base_weights,
    )
    return 0 if result is not None else 1


def run_recipe(args, what: str, step: str | None = None):
    """The run a step after merge works on and its recipe: --recipe, or the run's own (that step's, when it has run
    before: RUN/recipe.yaml holds the last step's reward), with the overrides applied."""
    from rlhf.config import apply_overrides, resolve_path, validate
    from rlhf.runs import existing_run

    run = existing_run(args.run, what)
    if args.recipe:
        recipe = resolve_recipe(args)
    else:  # the run's own recipe, with any overrides applied to it
        recipe = validate(apply_overrides(run.load_recipe(step).model_dump(mode="json"), list(args.overrides)))
    if getattr(args, "reward", None):
        args.reward = resolve_path(args.reward, Path.cwd())  # stored absolute: the run works from any folder
        recipe = recipe.model_copy(update={"reward": recipe.reward.model_copy(update={"name": args.reward})})
    return run, recipe


def _cmd_rl(args, step, name: str, what: str) -> int:
    """rlhf ppo / rlhf grpo: the same flow, each with its own step module and run subdirectory."""
    from rlhf import budget

    run, recipe = run_recipe(args, what, name)
    if args.auto_fit:
        recipe = budget.auto_fit(recipe, name, args.gpu)

    def attempt(recipe, retry: bool) -> None:
        resume = args.resume or (retry and any(getattr(run, f"{name}_checkpoints").glob("step-*")))
        step.run(
            recipe, run, reward=args.reward, resume=resume, force=args.force or (retry and not resume), gpu=args.gpu
        )

    _retry_on_oom(name, recipe, args, attempt)
    return 0


def cmd_ppo(args) -> int:
    from rlhf.ppo import step

    return _cmd_rl(args, step, "ppo", "train with PPO")


def cmd_grpo(args) -> int:
    from rlhf.grpo import step

    return _cmd_rl(args, step, "grpo", "train with GRPO")


def cmd_reward(args) -> int:
    from rlhf.reward_model import step

    if args.preference_dataset:
        args.overrides = [*args.overrides, f"reward_model.dataset={args.preference_dataset!r}"]
    run, recipe = run_recipe(args, "train a reward model on", "reward")
    step.run(recipe, run, resume=args.resume, force=args.force, gpu=args.gpu)
    return 0


def cmd_dpo(args) -> int:
    from rlhf import budget
    from rlhf.dpo import step

    if args.preference_dataset:
        args.overrides = [*args.overrides, f"dpo.dataset={args.preference_dataset!r}"]
    run, recipe = run_recipe(args, "train with DPO")
    if args.auto_fit:
        recipe = budget.auto_fit(recipe, "dpo", args.gpu)

    def attempt(recipe, retry: bool) -> None:
        resume = args.resume or (retry and any(run.dpo_checkpoints.glob("step-*")))
        step.run(recipe, run, resume=resume, force=args.force or (retry and not resume), gpu=args.gpu)

    _retry_on_oom("dpo", recipe, args, attempt)
    return 0


def _retry_on_oom(step: str, recipe, args, attempt) -> None:
    """Run `attempt(recipe, retry=False)`. On CUDA out-of-memory print this step's budget with the changes that shrink
    it, instead of a traceback; with --auto-fit retry once with the micro-batch halved (same effective batch)."""
    import torch

    for retry in (False, True):
        try:
            attempt(recipe, retry)
            return
        except torch.OutOfMemoryError as exc:
            reason = (str(exc).strip().splitlines() or ["out of memory"])[0]
        # Out of the except block, the failed step's frames (and their tensors) can be freed.
        _release_memory()
        _print_oom_budget(step, recipe, args.gpu)
        smaller = _halved(step, recipe) if args.auto_fit and not retry else None
        if smaller is None:
            again = "" if args.auto_fit else ", or rerun with --auto-fit"
            raise DoesNotFit(
                f"{step} ran out of GPU memory ({reason}); apply a change from the budget above as KEY=VALUE{again}"
            )
        recipe, change = smaller
        print(f"rlhf: warning: {step} ran out of GPU memory; --auto-fit: retrying once with {change}", file=sys.stderr)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _print_oom_budget(step: str, recipe, gpu: str | None) -> None:
    """The budget table of the failed step; when it predicted a fit, planned against 3/4 of its own prediction, so
    that the table lists the changes that would have made room."""
    from rlhf import budget
    from rlhf.units import format_bytes

    try:
        device = budget.resolve_device(gpu, recipe)
        est = budget.estimate(
            recipe, step, device.bytes, device_kind=device.kind, device_description=device.description
        )
        if est.fits:
            limit = int(est.total_bytes * 0.75)
            est = budget.estimate(
                recipe,
                step,
                limit,
                device_kind=device.kind,
                device_description=(
                    f"{format_bytes(limit)}, 3/4 of the predicted peak (the real one was higher: it ran out)"
                ),
            )
    except UserError:
        return  # the step ran, so this should not happen; the one-line error still says what to do
    print(budget.render_table(est), flush=True)


def _halved(step: str, recipe):
    """(recipe, "KEY=VALUE ...") with half the micro-batch and the same effective batch; None when it is already 1."""

    def largest_divisor(n: int, at_most: int) -> int:
        return max(d for d in range(1, max(at_most, 1) + 1) if n % d == 0)

    if step in ("sft", "dpo"):
        cfg = getattr(recipe, step)
        effective = cfg.batch_size * cfg.gradient_accumulation_steps
        if cfg.batch_size < 2:
            return None
        batch = largest_divisor(effective, cfg.batch_size // 2)
        update = {"batch_size": batch, "gradient_accumulation_steps": effective // batch}
        recipe = recipe.model_copy(update={step: cfg.model_copy(update=update)})
        return recipe, f"{step}.batch_size={batch} {step}.gradient_accumulation_steps={effective // batch}"
    cfg = getattr(recipe, step)  # ppo or grpo
    sequences = cfg.batch_size * getattr(cfg, "group_size", 1)
    micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    if micro < 2 and cfg.rollout_batch_size < 2:
        return None
    micro = largest_divisor(cfg.mini_batch_size, micro // 2)
    rollout = largest_divisor(sequences, min(cfg.rollout_batch_size, sequences) // 2)
    update = {"gradient_accumulation_steps": cfg.mini_batch_size // micro, "rollout_batch_size": rollout}
    recipe = recipe.model_copy(update={step: cfg.model_copy(update=update)})
    return recipe, (
        f"{step}.gradient_accumulation_steps={cfg.mini_batch_size // micro} {step}.rollout_batch_size={rollout}"
    )


def cmd_budget(args) -> int:
    from rlhf import budget

    if args.list and args.gpu:  # which shipped models fit that card, and with which settings
        from rlhf.budget import catalog

        return catalog.main(args.gpu, args.step, args.json)
    if args.list:
        from rlhf.budget.shapes import shipped_models

        rows = shipped_models()
        if args.json:
            print(json.dumps([{"model": m, "model_type": t, "params": n, "layers": k} for m, t, n, k in rows]))
        else:
            print("models whose shapes ship with rlhf (`rlhf budget --model ID` works offline for these):")
            for model, kind, params, layers in rows:
                print(f"  {model:<34} {kind:<10} {params / 1e9:6.2f} B parameters, {layers} layers")
        return 0
    recipe = resolve_recipe(args, default=None)
    return budget.main(recipe, args.step, args.gpu, args.json)


def cmd_preview(args) -> int:
    from rlhf import preview

    recipe = resolve_recipe(args)
    preview.main(recipe, args.n)
    return 0


def cmd_quickstart(args) -> int:
    from rlhf import quickstart

    return quickstart.main(args.run, force=args.force, algo=args.algo, reward_model=args.reward_model, task=args.task)


def cmd_report(args) -> int:
    from rlhf import report
    from rlhf.runs import existing_run

    path = report.write_report(existing_run(args.run, "report"))
    print(f"report: {path}")
    return 0


COMMANDS = {
    "sft": cmd_sft,
    "merge": cmd_merge,
    "reward": cmd_reward,
    "ppo": cmd_ppo,
    "grpo": cmd_grpo,
    "dpo": cmd_dpo,
    "budget": cmd_budget,
    "preview": cmd_preview,
    "quickstart": cmd_quickstart,
    "report": cmd_report,
}


def quiet_libraries() -> None:
    """Keep the libraries' own chatter (deprecation notes, loading bars, info logs) out of the user's terminal: rlhf
    prints what matters itself, and --debug shows everything again. Environment variables reach the libraries when
    they are imported later (no import here: `--help` stays fast); ones already imported are told directly."""
    import logging
    import warnings

    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    libraries = ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate", "torch", "trl")
    for library in libraries:
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    for name in (*libraries, "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("RLHF_DEBUG") == "1"
    if not debug:
        quiet_libraries()
    try:
        args = parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return COMMANDS[args.command](args)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"rlhf: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except DoesNotFit as exc:
        if debug:
            traceback.print_exc()
        print(f"rlhf: does not fit: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped reading (`rlhf budget | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one readable line, traceback on --debug
        from rlhf.errors import explain

        line, code = explain(exc)
        if debug or (code == 1 and not hasattr(exc, "exit_code")):
            traceback.print_exc()
        print(f"rlhf: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
