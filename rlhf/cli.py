"""The `rlhf` command: parse, dispatch, and turn failures into one clear line and an exit code.

Exit codes: 0 done; 1 a bug or a failed self-check; 2 a mistake in the input (the line says how to fix it);
3 the memory budget says the step does not fit (the report says what would); 130 interrupted.
"""

from __future__ import annotations

import argparse
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
        help="a shipped recipe (gpt-neox-20b, quickstart, memorize) or a YAML file" + (f"; default {default}" if default else ""),
    )


def _add_gpu(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu",
        metavar="NAME|SIZE",
        help="memory to plan against: rtx4090, rtx3090, a10, l4, t4, a100-40, a100-80, h100, or a size such as "
        "24GiB or 512MiB; default: the detected GPU's free memory (free RAM on CPU), or the recipe's budget.gpu",
    )


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="DIR", help="run directory (default: a new one under runs/ for sft, else runs/latest)")
    _add_gpu(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--force", action="store_true", help="go on although the budget says it will not fit; redo a finished step")
    p.add_argument("--auto-fit", action="store_true", help="pick the largest micro-batch that fits; keep the effective batch")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lora.rank=8")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rlhf",
        description="RLHF-tune a large language model on one GPU: sft -> merge -> ppo, with a memory budget first.",
        epilog="Start with `rlhf quickstart` (offline, minutes on a CPU). Exit codes: 2 bad input, 3 does not fit.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("sft", help="step 1: LoRA fine-tune a quantized base on text", epilog=EPILOG_OVERRIDES)
    _add_recipe(p)
    p.add_argument("--model", metavar="ALIAS|HUB_ID|PATH", help="a recipe alias (gpt-neox-20b), a hub id or a local dir")
    p.add_argument("--dataset", metavar="HUB_ID|PATH", help="a hub dataset, or a local json/jsonl/csv/parquet/txt file or dir")
    _add_common_train(p)

    p = sub.add_parser("merge", help="step 2: merge the SFT adapter into the fp16 base, shard by shard")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/latest)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], help="dtype of the merged model (default: the recipe's)")
    p.add_argument("--adapters", nargs="+", metavar="DIR", help="combine several LoRA adapters instead of the run's")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per adapter")
    p.add_argument(
        "--method", default="linear", choices=["linear", "cat", "ties", "dare_ties"], help="how to combine adapters"
    )
    p.add_argument("--force", action="store_true", help="merge again although merged/ exists; ignore the RAM check")

    p = sub.add_parser("ppo", help="step 3: PPO on the merged model with a reward model", epilog=EPILOG_OVERRIDES)
    _add_recipe(p)
    p.add_argument("--reward", metavar="NAME|PATH", help="a reward_models/NAME.yaml or a path to one (default: the recipe's)")
    _add_common_train(p)

    p = sub.add_parser("budget", help="predict memory, component by component, and say whether it fits")
    _add_recipe(p)
    p.add_argument("--model", metavar="ALIAS|HUB_ID|PATH", help="a recipe alias, a hub id or a local dir")
    p.add_argument("--step", default="all", choices=["sft", "merge", "ppo", "all"], help="which step (default all)")
    _add_gpu(p)
    p.add_argument("--json", action="store_true", help="print JSON for programs instead of the table")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")

    p = sub.add_parser("preview", help="show the first training examples exactly as the model will see them")
    _add_recipe(p)
    p.add_argument("--model", metavar="ALIAS|HUB_ID|PATH", help="a recipe alias, a hub id or a local dir")
    p.add_argument("--dataset", metavar="HUB_ID|PATH", help="dataset to preview")
    p.add_argument("-n", type=int, default=3, metavar="N", help="number of examples (default 3)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")

    p = sub.add_parser("quickstart", help="the whole flow offline on tiny models: budget, sft, merge, ppo, eval, report")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/quickstart-<time>)")
    p.add_argument("--force", action="store_true", help="reuse a run directory that holds a quickstart run")

    p = sub.add_parser("report", help="write RUN/report.md and its plots for a run")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/latest)")
    return parser


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
        overrides.insert(0, f"model.name={model}")
    dataset = getattr(args, "dataset", None)
    if dataset:
        overrides.insert(0, f"data.dataset={dataset}")
    if name is None and model is None:
        name = default
    # Quote values so a hub id or a path is never re-typed by YAML (e.g. a name like 1e5).
    return load_recipe(name, [_quote_first_class(o) for o in overrides])


def _quote_first_class(item: str) -> str:
    key, _, value = item.partition("=")
    if key in ("model.name", "data.dataset"):
        return f"{key}={value!r}" if not value.startswith(("'", '"')) else item
    return item


def cmd_sft(args) -> int:
    from rlhf import budget, sft
    from rlhf.runs import Run, new_run_dir

    recipe = resolve_recipe(args)
    if args.auto_fit:
        recipe = budget.auto_fit(recipe, "sft", args.gpu)
    run = Run(Path(args.run)) if args.run else new_run_dir(recipe)
    sft.run(recipe, run, resume=args.resume, force=args.force, gpu=args.gpu)
    return 0


def cmd_merge(args) -> int:
    from rlhf import merge

    if args.weights and not args.adapters:
        raise UserError("--weights goes with --adapters A B ...: one weight per adapter")
    result = merge.run(args.run, dtype=args.dtype, force=args.force, adapters=args.adapters, weights=args.weights,
                       method=args.method)
    return 0 if result is not None else 1


def cmd_ppo(args) -> int:
    from rlhf.ppo import trainer

    trainer.main(args)
    return 0


def cmd_budget(args) -> int:
    from rlhf import budget

    recipe = resolve_recipe(args, default=None)
    return budget.main(recipe, args.step, args.gpu, args.json)


def cmd_preview(args) -> int:
    from rlhf import preview

    recipe = resolve_recipe(args)
    preview.main(recipe, args.n)
    return 0


def cmd_quickstart(args) -> int:
    from rlhf import quickstart

    return quickstart.main(args.run, force=args.force)


def cmd_report(args) -> int:
    from rlhf import report
    from rlhf.runs import existing_run

    path = report.write_report(existing_run(args.run, "report"))
    print(f"report: {path}")
    return 0


COMMANDS = {
    "sft": cmd_sft,
    "merge": cmd_merge,
    "ppo": cmd_ppo,
    "budget": cmd_budget,
    "preview": cmd_preview,
    "quickstart": cmd_quickstart,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("RLHF_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
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
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one readable line, traceback on --debug
        from rlhf.errors import explain

        line, code = explain(exc)
        if debug or (code == 1 and not hasattr(exc, "exit_code")):
            traceback.print_exc()
        print(f"rlhf: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
