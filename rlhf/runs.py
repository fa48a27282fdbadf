"""The run directory: where each step reads its inputs and writes its outputs (DESIGN.md, "Run directory contract").

    RUN/recipe.yaml  sft/adapter  sft/metrics.jsonl  merged/  ppo/adapter  ppo/checkpoints/step-N  ppo/metrics.jsonl
    grpo/ (rlhf grpo) as ppo/, without a value head
    reward/adapter  reward/checkpoints/step-N  reward/metrics.jsonl  reward/eval.json  (rlhf reward)
    dpo/adapter  dpo/checkpoints/step-N  dpo/metrics.jsonl  dpo/eval.json  (rlhf dpo)

With no `--run`, `sft` starts a new directory under runs/ and every step after it works on the most recent one,
recorded as the symlink runs/latest (or the text file runs/LATEST where symlinks are not available).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf.config import Recipe, is_path_key, resolve_paths, validate
from rlhf.errors import UserError
from rlhf.io import atomic_write_text


def runs_root() -> Path:
    """Where new runs go and runs/latest lives: ./runs, or $RLHF_RUNS."""
    return Path(os.environ.get("RLHF_RUNS", "runs"))


@dataclass(frozen=True)
class Run:
    root: Path

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def sft_dir(self) -> Path:
        return self.root / "sft"

    @property
    def sft_adapter(self) -> Path:
        return self.root / "sft" / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def ppo_dir(self) -> Path:
        return self.root / "ppo"

    @property
    def ppo_adapter(self) -> Path:
        return self.root / "ppo" / "adapter"

    @property
    def ppo_checkpoints(self) -> Path:
        return self.root / "ppo" / "checkpoints"

    @property
    def grpo_dir(self) -> Path:
        return self.root / "grpo"

    @property
    def grpo_adapter(self) -> Path:
        return self.root / "grpo" / "adapter"

    @property
    def grpo_checkpoints(self) -> Path:
        return self.root / "grpo" / "checkpoints"

    @property
    def reward_dir(self) -> Path:
        return self.root / "reward"

    @property
    def reward_adapter(self) -> Path:
        return self.root / "reward" / "adapter"

    @property
    def reward_checkpoints(self) -> Path:
        return self.root / "reward" / "checkpoints"

    @property
    def dpo_dir(self) -> Path:
        return self.root / "dpo"

    @property
    def dpo_adapter(self) -> Path:
        return self.root / "dpo" / "adapter"

    @property
    def dpo_checkpoints(self) -> Path:
        return self.root / "dpo" / "checkpoints"

    def step_recipe_path(self, step: str) -> Path:
        return self.root / step / "recipe.yaml"

    def load_recipe(self, step: str | None = None) -> Recipe:
        """RUN/recipe.yaml (the last step's), or with `step` that step's own RUN/STEP/recipe.yaml when it has one.
        Paths in it are relative to the run when they lie inside it, so a moved run still finds its own files."""
        path = self.step_recipe_path(step) if step and self.step_recipe_path(step).is_file() else self.recipe_path
        if not path.is_file():
            raise UserError(
                f"{self.root} is not an rlhf run (no recipe.yaml); start one with `rlhf sft --run {self.root}`"
            )
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML ({exc}); restore it or start a new run") from None
        if isinstance(raw, dict):
            resolve_paths(raw, self.root, Path.cwd())
        return validate(raw, str(path))

    def write_recipe(self, recipe: Recipe, step: str | None = None) -> None:
        """RUN/recipe.yaml, and with `step` also RUN/STEP/recipe.yaml: the settings that step ran with, which a later
        step's rewrite of RUN/recipe.yaml cannot change."""
        raw = recipe.model_dump(mode="json")
        root = self.root.resolve()
        for section, values in raw.items():
            for key, value in values.items() if isinstance(values, dict) else ():
                if is_path_key((section, key)) and isinstance(value, str) and Path(value).is_absolute():
                    if Path(value).is_relative_to(root):  # the run's own files move with it
                        values[key] = str(Path(value).relative_to(root))
        text = yaml.safe_dump(raw, sort_keys=False)
        if step:
            atomic_write_text(self.step_recipe_path(step), text)
        atomic_write_text(self.recipe_path, text)


def merged_run_recipe(run: Run, recipe: Recipe) -> Recipe:
    """The recipe `run` was trained with, once it is known to hold a merged model of `recipe`'s model: what every step
    after `rlhf merge` (reward, ppo, grpo) starts from."""
    if not run.recipe_path.is_file():
        raise UserError(f"{run.root} holds no run; run `rlhf sft --run {run.root}` and `rlhf merge` first")
    trained = run.load_recipe()
    if trained.model.name != recipe.model.name:
        raise UserError(
            f"{run.root} was trained from '{trained.model.name}', but the recipe names '{recipe.model.name}'; "
            f"use the run's recipe (omit --recipe) or another --run"
        )
    if not (run.merged / "config.json").is_file():
        raise UserError(f"no merged model in {run.root}; run `rlhf merge --run {run.root}` first")
    return trained


def _latest_link(root: Path) -> Path:
    return root / "latest"


def mark_latest(run: Run, root: Path | None = None) -> None:
    """Point runs/latest at this run, replacing the old pointer in one rename."""
    root = root or runs_root()
    root.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(run.root.resolve(), root.resolve())
    tmp = root / f".latest.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, _latest_link(root))
    except OSError:
        atomic_write_text(root / "LATEST", str(run.root.resolve()) + "\n")


def latest_run(root: Path | None = None) -> Run | None:
    root = root or runs_root()
    link = _latest_link(root)
    if link.is_symlink() and link.resolve().is_dir():
        return Run(link.resolve())
    record = root / "LATEST"
    if record.is_file():
        path = Path(record.read_text().strip())
        if path.is_dir():
            return Run(path)
    return None


def new_run_dir(recipe: Recipe, root: Path | None = None) -> Run:
    root = root or runs_root()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{recipe.name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{recipe.name}-{stamp}-{n}"
    return Run(path)


def check_writable(path: Path) -> None:
    """A UserError naming `path` (or the folder that would hold it) when nothing can be written there: found before
    minutes of loading, not at the first checkpoint. A probe file, as permissions alone do not tell (root, a read-only
    mount, an immutable folder)."""
    import errno
    import tempfile

    folder = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not folder.is_dir():
        return  # a file where a directory belongs: the step's own check says so
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"{folder} is full; free space there, or pass another --run DIR") from None
        raise UserError(
            f"cannot write in {folder} ({exc.strerror}); make it writable, or pass another --run DIR"
        ) from None


def existing_run(run_dir: str | None, step: str) -> Run:
    """The run a later step works on: the one named, or the most recent one."""
    if run_dir is not None:
        run = Run(Path(run_dir))
        if run.root.exists() and not run.root.is_dir():
            raise UserError(f"--run {run_dir} is a file, not a run directory; pass the directory `rlhf sft` wrote")
        if not run.root.is_dir():
            raise UserError(f"run directory '{run_dir}' does not exist; start a run with `rlhf sft --run {run_dir}`")
    else:
        run = latest_run()
        if run is None:
            raise UserError(f"no run to {step}: pass --run DIR, or start one with `rlhf sft`")
    check_writable(run.root)
    return run
