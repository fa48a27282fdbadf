"""A run directory does not depend on the folder it was started from: paths are resolved when read (a recipe's against
its own folder, a command line's against the current one, a callable reward's module also from its spec's folder),
stored so that a moved run still works, and each step keeps its own settings in RUN/STEP/recipe.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from conftest import cli

from rlhf.config import load_recipe
from rlhf.io import read_jsonl
from rlhf.runs import Run

PPO = ["ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1",
       "ppo.eval_prompts=4", "ppo.save_steps=1", "ppo.sample_every=1"]  # fmt: skip
GRPO = ["grpo.batch_size=2", "grpo.group_size=4", "grpo.mini_batch_size=8", "grpo.rollout_batch_size=8",
        "grpo.eval_prompts=4", "grpo.save_steps=1", "grpo.max_steps=1"]  # fmt: skip


def _callable_spec(folder: Path) -> Path:
    """A reward spec with its Python module beside it, as a user writes one in their project folder."""
    folder.mkdir(parents=True)
    (folder / "wordcount_reward.py").write_text(
        "def score(texts, **kwargs):\n    return [len(t.split()) / 10.0 - 1.0 for t in texts]\n"
    )
    (folder / "words.yaml").write_text("name: words\ntype: callable\ncallable: wordcount_reward:score\n")
    return folder / "words.yaml"


def test_recipe_paths_are_read_from_the_recipe_folder_and_stored_so_a_moved_run_finds_them(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data/reviews.jsonl").write_text('{"text": "a review"}\n')
    spec = _callable_spec(project / "rewards")
    recipe_file = project / "recipe.yaml"
    recipe_file.write_text("data:\n  dataset: data/reviews.jsonl\nreward:\n  name: rewards/words.yaml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(elsewhere)

    recipe = load_recipe("../project/recipe.yaml", ["reward_model.dataset=mine.jsonl"])
    assert recipe.data.dataset == str(project / "data/reviews.jsonl")  # the recipe's folder, not the cwd
    assert recipe.reward.name == str(spec)
    assert recipe.reward_model.dataset == str(elsewhere / "mine.jsonl")  # an override: the cwd
    assert load_recipe(None, ["data.dataset=stanfordnlp/imdb"]).data.dataset == "stanfordnlp/imdb"  # a hub id stays

    run = Run(tmp_path / "runs/x")
    (run.root / "reward/adapter").mkdir(parents=True)
    own = recipe.model_copy(update={"reward": recipe.reward.model_copy(update={"name": str(run.root / "reward")})})
    run.write_recipe(own, "ppo")
    stored = yaml.safe_load(run.recipe_path.read_text())
    assert stored["reward"]["name"] == "reward"  # inside the run: relative to it, so it moves with it
    assert stored["data"]["dataset"] == str(project / "data/reviews.jsonl")
    assert (run.root / "ppo/recipe.yaml").read_text() == run.recipe_path.read_text()
    moved = Run(tmp_path / "moved/x")
    moved.root.parent.mkdir()
    shutil.move(run.root, moved.root)
    assert moved.load_recipe("ppo").reward.name == str((moved.root / "reward").resolve())


def test_a_moved_run_continues_from_anywhere_and_its_report_names_each_steps_reward(
    merged_run, tmp_path, monkeypatch, capsys
):
    project = tmp_path / "project"
    _callable_spec(project)
    run = tmp_path / "a/run"
    shutil.copytree(merged_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    monkeypatch.chdir(project)
    assert cli("ppo", "--recipe", "quickstart", "--run", "../a/run", "--reward", "words.yaml", *PPO,
               "ppo.max_steps=1") == 0  # fmt: skip

    shutil.move(tmp_path / "a", tmp_path / "b")  # the run moves; the command runs from a folder of no relevance
    (tmp_path / "c").mkdir()
    monkeypatch.chdir(tmp_path / "c")
    assert cli("grpo", "--recipe", "quickstart", "--run", "../b/run", "--reward", "quickstart-sentiment", *GRPO) == 0
    # PPO continues on its own reward, though GRPO's rewrote RUN/recipe.yaml since
    capsys.readouterr()
    assert cli("ppo", "--run", "../b/run", "--resume", "ppo.max_steps=2") == 0, capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(tmp_path / "b/run/ppo/metrics.jsonl")] == [1, 2]
    assert cli("report", "--run", "../b/run") == 0

    moved = tmp_path / "b/run"
    ppo_reward = yaml.safe_load((moved / "ppo/recipe.yaml").read_text())["reward"]["name"]
    assert ppo_reward == str(project / "words.yaml")
    assert yaml.safe_load((moved / "grpo/recipe.yaml").read_text())["reward"]["name"] == "quickstart-sentiment"
    report = (moved / "report.md").read_text()
    assert f"- reward (PPO): `{project / 'words.yaml'}`" in report, report
    assert "- reward (GRPO): `quickstart-sentiment`" in report
    assert f"### PPO reward ({project / 'words.yaml'})" in report and "### GRPO reward (quickstart-sentiment)" in report
