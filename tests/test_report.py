"""`rlhf report`: report.md with the evaluation and generation tables, and readable PNG plots beside it.

The runs here are written by hand in the layout of the run-directory contract (DESIGN.md), so the report is tested in
seconds without training; tests/test_notebooks.py and the quickstart exercise it on a real run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import cli

from rlhf.config import load_recipe
from rlhf.io import append_jsonl, atomic_write_json
from rlhf.report import md_cell, write_report
from rlhf.runs import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("sft_loss.png", "ppo_reward.png", "ppo_kl.png")


def write_sft(root: Path, steps: int = 40) -> None:
    Run(root).write_recipe(load_recipe("quickstart"))
    for step in range(1, steps + 1, 2):
        append_jsonl(
            root / "sft" / "metrics.jsonl",
            {
                "step": step,
                "loss": 3.0 * math.exp(-step / 15) + 1.2,
                "lr": 1e-3 * (1 - step / (steps + 1)),
                "grad_norm": 0.5,
                "epoch": step / 200,
            },
        )


# distinct-2 0.571 -> 0.482 is 0.84x its value before: less varied, but not the collapse the report warns about
DIVERSITY = {
    "distinct_1_before": 0.412,
    "distinct_1_after": 0.305,
    "distinct_2_before": 0.571,
    "distinct_2_after": 0.482,
    "repetition_before": 0.06,
    "repetition_after": 0.12,
    "response_perplexity_before": 12.5,
    "response_perplexity_after": 9.75,
}


def write_ppo(root: Path, steps: int = 30, step_dir: str = "ppo", **eval_keys) -> None:
    """A PPO run's files by hand; step_dir="grpo" writes the critic-free step's (no value loss); eval_keys override
    or, given as None, drop keys of eval.json."""
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "reward_mean": -0.5 + step * 0.1,
            "reward_std": 2.0 - step * 0.02,
            "positive_rate": min(1.0, 0.4 + step * 0.02),
            "kl": 0.3 * step,
            "kl_coef": 0.05 * (1 + step * 1e-4),
            "policy_loss": -0.01,
            "value_loss": 1.5,
            "entropy": 1.7,
            "clipfrac": 0.1,
            "approx_kl": 0.02,
            "response_len": 10.0,
            "tokens_per_s": 5.0,
            "peak_mem_bytes": 7 << 28,
            "time_generate": 3.0,
            "time_reward": 0.2,
            "time_forward": 1.0,
            "time_train": 1.5,
            "time_step": 5.8,
        }
        if step_dir == "grpo":
            del row["value_loss"]
        append_jsonl(root / step_dir / "metrics.jsonl", row)
    append_jsonl(root / step_dir / "samples.jsonl", {"step": 1, "prompt": "It is", "response": " fine", "reward": 0.1})
    prompts = ["This film | that film", "So I\nfinally saw", "It is"]
    ev = {
        "reward_before": -0.544,
        "reward_after": 2.125,
        "positive_rate_before": 0.375,
        "positive_rate_after": 0.875,
        "kl_before": 0.0,
        "kl_after": 4.25,
        "perplexity_before": 3.84,
        "perplexity_after": 4.07,
        "n_prompts": 3,
        "eval_split": "test",
        "steps": steps,
        "samples_before": [{"prompt": p, "response": f" was dull|{i}", "reward": -1.5} for i, p in enumerate(prompts)],
        "samples_after": [
            {"prompt": p, "response": f" was a delight\n{i}", "reward": 3.25} for i, p in enumerate(prompts)
        ],
        **DIVERSITY,
    }
    ev.update(eval_keys)
    atomic_write_json(root / step_dir / "eval.json", {k: v for k, v in ev.items() if v is not None})
    for part in ("merged", f"{step_dir}/adapter", "sft/adapter"):
        (root / part).mkdir(parents=True, exist_ok=True)


@pytest.fixture
def full_run(tmp_path) -> Path:
    root = tmp_path / "run"
    write_sft(root)
    write_ppo(root)
    return root


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is suspiciously small ({len(data)} bytes)"


def test_full_run_gets_tables_and_every_plot(full_run):
    path = write_report(Run(full_run), {"sft": 40.0, "merge": 3.5, "ppo": 120.25})

    assert path == full_run / "report.md"
    text = path.read_text()
    assert text.startswith(f"# rlhf run report: {full_run.name}")
    assert "quickstart" in text and "fixture:tiny-gpt-neox" in text and "quickstart-sentiment" in text
    # the evaluation table: before, after and change for each metric, and the number of prompts
    assert "| reward (mean score) | -0.544 | 2.125 | +2.669 |" in text
    assert "| positive rate | 0.38 | 0.88 | +0.50 |" in text
    assert "| KL to reference (nats/response) | 0.000 | 4.250 | +4.250 |" in text
    assert "| perplexity on held-out text | 3.84 | 4.07 | +0.23 |" in text
    # diversity and fluency of the responses beside reward and KL; 0.84x is no collapse
    assert "| distinct-1 of responses (unique words / words) | 0.412 | 0.305 | -0.107 |" in text
    assert "| distinct-2 of responses (unique word pairs / pairs) | 0.571 | 0.482 | -0.089 |" in text
    assert "| responses repeating a word pair (share) | 0.06 | 0.12 | +0.06 |" in text
    assert "| reference-model perplexity of responses | 12.50 | 9.75 | -2.75 |" in text
    assert "diversity collapsed" not in text
    assert "| prompts | 3 | 3 |  |" in text
    for name in PLOTS:
        assert f"]({name})" in text  # embedded with a relative link
        assert_png(full_run / name)
    assert "Not drawn" not in text
    assert "reward `before`" not in text, "the total reward is the first row, not one reward of a spec"
    # generations: the same prompt before and after, pipes and newlines escaped so each sample stays one table row
    assert "| 1 | This film \\| that film | was dull\\|0 | -1.50 | was a delight<br>0 | +3.25 |" in text
    assert "| 2 | So I<br>finally saw |" in text
    # timings given by the caller, and the PPO phases from metrics
    assert "| ppo | 120.2 |" in text and "| **total** | **163.8** |" in text
    assert "| generate | 3.00 | 52% |" in text
    for artifact in ("`sft/adapter`", "`merged`", "`ppo/adapter`"):
        assert artifact in text
    assert not list(full_run.glob(".*.tmp")), "temporary files left behind"


def test_diversity_collapse_is_flagged(tmp_path):
    root = tmp_path / "collapsed"
    write_ppo(root, distinct_2_before=0.57, distinct_2_after=0.45)  # 0.79x: just below 0.8x

    text = write_report(Run(root)).read_text()

    assert "| distinct-2 of responses (unique word pairs / pairs) | 0.570 | 0.450 | -0.120 |" in text
    warning = [line for line in text.splitlines() if "diversity collapsed" in line]
    assert len(warning) == 1 and warning[0].startswith(
        "**Warning: diversity collapsed: distinct-2 0.57 -> 0.45 (< 0.8x).**"
    )


def test_run_from_before_the_diversity_keys_gets_the_old_table(tmp_path):
    root = tmp_path / "old"
    write_ppo(root, **dict.fromkeys(DIVERSITY))  # an eval.json written before distinct-n, repetition, fluency

    text = write_report(Run(root)).read_text()

    assert "| reward (mean score) | -0.544 | 2.125 | +2.669 |" in text
    assert "| perplexity on held-out text | 3.84 | 4.07 | +0.23 |" in text
    assert "distinct" not in text and "repeating" not in text and "of responses" not in text
    assert "Warning" not in text


def test_grpo_run_is_reported_like_ppo(tmp_path):
    root = tmp_path / "grpo"
    write_sft(root)
    write_ppo(root, step_dir="grpo", distinct_2_before=0.6, distinct_2_after=0.3)

    text = write_report(Run(root), {"grpo": 60.0}).read_text()

    assert "## GRPO evaluation on held-out prompts" in text and "| metric | before GRPO | after GRPO | change |" in text
    assert "| reward (mean score) | -0.544 | 2.125 | +2.669 |" in text
    assert "**Warning: diversity collapsed: distinct-2 0.60 -> 0.30 (< 0.8x).**" in text
    for name in ("grpo_reward.png", "grpo_kl.png"):
        assert f"]({name})" in text
        assert_png(root / name)
    assert "## Generations before and after GRPO" in text and "| 1 | This film \\| that film |" in text
    assert "### Where a GRPO step spends its time" in text
    assert "| GRPO evaluation | `grpo/eval.json` | yes |" in text
    assert "PPO" not in text, "nothing pretends PPO ran, the recipe's settings included"
    assert "- GRPO: 8 prompts x 8 samples, grpo advantages, mini-batch 16, 2 epochs" in text
    assert not (root / "ppo_reward.png").exists()


def test_run_with_ppo_and_grpo_reports_both(tmp_path):
    root = tmp_path / "both"
    write_ppo(root)
    write_ppo(root, step_dir="grpo", reward_after=1.5)

    text = write_report(Run(root)).read_text()

    ppo, grpo = text.split("## GRPO evaluation on held-out prompts")
    assert "## PPO evaluation on held-out prompts" in ppo and "| reward (mean score) | -0.544 | 2.125 | +2.669 |" in ppo
    assert "| reward (mean score) | -0.544 | 1.500 | +2.044 |" in grpo
    for name in ("ppo_reward.png", "ppo_kl.png", "grpo_reward.png", "grpo_kl.png"):
        assert_png(root / name)


def test_sft_only_run_gets_the_sft_plot_and_says_what_is_missing(tmp_path):
    root = tmp_path / "sft-only"
    write_sft(root)
    (root / "ppo_kl.png").write_bytes(b"stale")  # from an earlier state of the run: must not survive

    text = write_report(Run(root)).read_text()

    assert_png(root / "sft_loss.png")
    assert not (root / "ppo_reward.png").exists() and not (root / "ppo_kl.png").exists()
    assert "](sft_loss.png)" in text and "](ppo_reward.png)" not in text
    assert text.count("_Not drawn: no PPO metrics") == 2
    assert "No PPO evaluation yet" in text and "No samples" in text
    assert "## Timings" not in text
    assert "| SFT LoRA adapter | `sft/adapter` | not yet |" in text  # this fake run has metrics but no adapter
    assert "| PPO policy adapter + value_head.safetensors | `ppo/adapter` | not yet |" in text


def test_report_is_rewritten_in_place(full_run):
    write_report(Run(full_run))
    first = (full_run / "report.md").read_text()
    write_report(Run(full_run))
    assert (full_run / "report.md").read_text().splitlines()[4:] == first.splitlines()[4:]  # all but the date


def test_one_ppo_step_and_a_damaged_recipe_still_give_a_report(tmp_path):
    root = tmp_path / "short"
    write_ppo(root, steps=1)
    (root / "recipe.yaml").write_text("model: [unclosed\n")

    text = write_report(Run(root)).read_text()

    assert "- recipe: unreadable" in text
    assert_png(root / "ppo_reward.png")
    assert_png(root / "ppo_kl.png")
    assert "_Not drawn: no SFT metrics" in text


def test_recipe_line_names_the_adapted_layers(tmp_path):
    """The SFT LoRA targets as the adapter recorded them (what `auto` chose), the recipe's word before there is one."""
    run = Run(tmp_path / "auto")
    run.write_recipe(load_recipe("quickstart", ["lora.target_modules=auto"]))
    assert "alpha=32 on auto\n" in write_report(run).read_text()

    run.sft_adapter.mkdir(parents=True)
    (run.sft_adapter / "adapter_config.json").write_text('{"target_modules": ["v_proj", "q_proj"]}')
    assert "alpha=32 on q_proj, v_proj\n" in write_report(run).read_text()


def test_md_cell_keeps_one_row():
    assert md_cell("a|b\nc\r\nd") == "a\\|b<br>c<br>d"
    assert md_cell("<eos>") == "&lt;eos&gt;"
    assert md_cell("   ") == "(empty)"
    assert md_cell("x" * 1000).endswith("…") and len(md_cell("x" * 1000)) < 500


def test_cli_report(full_run, capsys):
    assert cli("report", "--run", full_run) == 0
    assert str(full_run / "report.md") in capsys.readouterr().out
    assert (full_run / "report.md").is_file()


def test_cli_report_on_a_directory_without_a_run(tmp_path, capsys):
    assert cli("report", "--run", tmp_path) == 2
    err = capsys.readouterr().err
    assert "no rlhf run" in err and str(tmp_path) in err
    assert not (tmp_path / "report.md").exists()


def test_learned_reward_model_gets_its_section(tmp_path):
    root = tmp_path / "reward"
    write_sft(root)
    write_ppo(root)
    for step in range(1, 21):
        row = {"step": step, "loss": 0.69 * math.exp(-step / 8), "accuracy": min(1.0, 0.5 + step * 0.03)}
        append_jsonl(root / "reward" / "metrics.jsonl", row)
    ev = {"n_pairs": 256, "eval_split": "test", "steps": 20, "train_pairs": 3764}
    for key, before, after in (("accuracy", 0.48, 0.984), ("margin_mean", 0.0, 4.6), ("loss", 0.693, 0.051)):
        ev |= {f"{key}_before": before, f"{key}_after": after}
    atomic_write_json(root / "reward" / "eval.json", ev)
    recipe = load_recipe("quickstart", ["reward.name=runs/x/reward", "reward.judge=quickstart-sentiment"])
    Run(root).write_recipe(recipe)

    text = write_report(Run(root)).read_text()

    assert "## Reward model (rlhf reward) on held-out pairs" in text
    assert "| pairwise accuracy (chosen scored higher) | 0.480 | 0.984 | +0.504 |" in text
    assert "| pairs | 256 | 256 |  |" in text
    assert "mean score, chosen" not in text  # a metric this run did not record: no row of dashes
    assert "](reward_model.png)" in text
    assert_png(root / "reward_model.png")
    assert "positive rate judged by `quickstart-sentiment`" in text
    assert "| reward model evaluation | `reward/eval.json` | yes |" in text
    assert text.index("## Reward model") < text.index("## PPO evaluation")  # step 2 before step 3


def test_run_without_a_reward_model_has_no_such_section(full_run):
    text = write_report(Run(full_run)).read_text()
    assert "Reward model" not in text and "reward model adapter" not in text


def test_each_step_is_titled_with_its_own_reward_and_split(tmp_path):
    """PPO on one reward, then GRPO on another: RUN/recipe.yaml names the last one, each step's own file its own."""
    root = tmp_path / "two-rewards"
    run = Run(root)
    write_sft(root)
    write_ppo(root, eval_split="train (last 8, held out of training)")
    write_ppo(root, step_dir="grpo")
    run.write_recipe(load_recipe("quickstart", ["reward.name=imdb-sentiment"]), "ppo")
    run.write_recipe(load_recipe("quickstart", ["reward.name=quickstart-sentiment"]), "grpo")

    text = write_report(run).read_text()

    assert "- reward (PPO): `imdb-sentiment`" in text and "- reward (GRPO): `quickstart-sentiment`" in text
    assert "### PPO reward (imdb-sentiment)" in text and "### GRPO reward (quickstart-sentiment)" in text
    # The header says which split each evaluation used, as the tables below do (not the recipe's eval_split).
    assert "held out: PPO: `train (last 8, held out of training)`, GRPO: `test`)" in text
    assert "held-out prompts from split `train (last 8, held out of training)`" in text


def test_perplexity_far_above_the_references_is_flagged(tmp_path):
    root = tmp_path / "gibberish"
    write_ppo(root, response_perplexity_before=12.5, response_perplexity_after=310.0)
    text = write_report(Run(root)).read_text()
    assert "**Warning: the reference model's perplexity of the responses rose 12.50 -> 310.00 (24.8x" in text
    assert "perplexity on held-out text rose" not in text  # 3.84 -> 4.07 is no alarm
    write_ppo(tmp_path / "ok")
    assert "Warning: the reference" not in write_report(Run(tmp_path / "ok")).read_text()


def test_an_sft_loss_above_uniform_guessing_gets_a_hint(tmp_path):
    root = tmp_path / "sft"
    write_sft(root)  # its last loss is 1.42
    (root / "merged").mkdir()
    (root / "merged/config.json").write_text('{"vocab_size": 3}')  # ln 3 = 1.10: worse than guessing
    assert "**SFT loss 1.42 is above ln(vocabulary) = 1.10" in write_report(Run(root)).read_text()
    (root / "merged/config.json").write_text('{"vocab_size": 2048}')
    assert "above ln(vocabulary)" not in write_report(Run(root)).read_text()


def test_dpo_run_gets_its_pairs_and_judged_generations_without_task_rows(tmp_path):
    root = tmp_path / "dpo"
    write_sft(root)
    # dpo/eval.json's accuracy_* are its held-out pairs' (no task reward): a row of the pairs table only
    write_ppo(root, step_dir="dpo", accuracy_before=0.0, accuracy_after=0.93, n_pairs=937, judge="quickstart-sentiment",
              loss_type="sigmoid", beta=0.5, label_smoothing=0.1)  # fmt: skip
    for step in (1, 2):
        append_jsonl(root / "dpo/metrics.jsonl", {"step": step, "loss": 0.6 / step, "accuracy": 0.5 * step})

    text = write_report(Run(root)).read_text()

    assert "| preference accuracy (chosen's implicit reward higher) | 0.000 | 0.930 | +0.930 |" in text
    assert "| positive rate | 0.38 | 0.88 | +0.50 |" in text and "_Judged by `quickstart-sentiment`._" in text
    assert "accuracy (`" not in text and "reward `" not in text, "no task-reward rows in a DPO report"
    assert "reward = the judge's score of prompt + response" in text
    assert "sigmoid loss, beta 0.5, label smoothing 0.1;" in text
