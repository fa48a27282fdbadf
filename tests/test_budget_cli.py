"""`rlhf budget` as scripts use it: exit 3 when a step does not fit, JSON with the peak moment, the device and the
suggestions, every suggestion pasteable as given and, pasted back, giving the total it promised; GPU names; a hub
model's dtype from its config; a CPU plan said in the first line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli

from rlhf.budget import gpu_bytes
from rlhf.cli import build_parser

# (arguments, what the budget should say): shapes ship with rlhf, so none of these needs the hub or a GPU.
CASES = [
    ("--model", "gpt-neox-20b", "--step", "ppo", "--gpu", "12GiB"),
    ("--model", "gpt-neox-20b", "--step", "ppo", "--gpu", "16GiB"),
    ("--model", "gpt-neox-20b", "--step", "sft", "--gpu", "12GiB"),
    ("--recipe", "qwen2.5-14b", "--step", "grpo", "--gpu", "12GiB"),
    ("--recipe", "qwen2.5-14b", "--step", "reward", "--gpu", "12GiB"),
]


def _budget_json(capsys, *args) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli("budget", *args, "--json")
    return code, json.loads(capsys.readouterr().out)


def test_exit_3_when_it_does_not_fit_and_the_json_says_why(capsys):
    code, data = _budget_json(capsys, *CASES[0])
    assert code == 3 and data["fits"] is False
    assert data["peak_moment"] == "generation (KV cache)" and data["device_kind"] == "cuda"
    assert data["device"].startswith("12.00 GiB")
    assert data["suggestions"] and all({"overrides", "total_bytes", "fits"} <= s.keys() for s in data["suggestions"])
    code, data = _budget_json(capsys, "--model", "gpt-neox-20b", "--step", "ppo", "--gpu", "24GiB")
    assert code == 0 and data["fits"] is True and data["suggestions"] == []
    code, data = _budget_json(capsys, "--model", "gpt-neox-20b", "--step", "all", "--gpu", "12GiB")
    assert code == 3 and [d["step"] for d in data] == ["sft", "merge", "reward", "ppo", "grpo", "dpo"]
    budget_help = build_parser()._subparsers._group_actions[0].choices["budget"].format_help()
    assert "3 a step does not fit" in budget_help.replace("\n", " ")


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c[1:4:2]) + " " + c[-1] for c in CASES])
def test_each_suggestion_pasted_back_gives_what_it_promised(capsys, args):
    code, data = _budget_json(capsys, *args)
    assert code == 3 and data["suggestions"]
    for suggestion in data["suggestions"]:
        overrides = suggestion["overrides"].split()
        assert all("=" in o and ":" not in o.split("=")[0] for o in overrides), suggestion  # KEY=VALUE, nothing else
        # useful: no response of a token or two, no rollout of one sequence saving no more than a larger one would
        assert not any(o.endswith(("max_new_tokens=1", "max_new_tokens=2", "rollout_batch_size=1")) for o in overrides)
        again_code, again = _budget_json(capsys, *args, *overrides)
        assert again["total_bytes"] == suggestion["total_bytes"], suggestion
        assert again["fits"] is suggestion["fits"] and again_code == (0 if suggestion["fits"] else 3), suggestion
    assert any(s["fits"] for s in data["suggestions"])


def test_common_cards_by_name():
    names = ["rtx3060", "3060", "rtx4060ti-16gb", "4070 Ti Super", "RTX 4080", "4090", "GeForce RTX 5090", "A10G",
             "L4", "T4"]  # fmt: skip
    sizes = {name: gpu_bytes(name) for name in names}
    assert sizes["rtx3060"] == sizes["3060"] < 12 * 2**30 < sizes["rtx4060ti-16gb"] == sizes["RTX 4080"] < 16 * 2**30
    assert 22 * 2**30 < sizes["A10G"] < sizes["4090"] < 24 * 2**30 < sizes["GeForce RTX 5090"] < 32 * 2**30
    assert sizes["T4"] < sizes["4070 Ti Super"] and sizes["L4"] < sizes["4090"]


def test_a_hub_models_dtype_comes_from_its_config(capsys):
    assert cli("budget", "--model", "Qwen/Qwen2.5-7B", "--step", "sft", "--gpu", "24GiB") == 0
    assert "8bit, bfloat16;" in capsys.readouterr().out  # a bf16 checkpoint is not planned (or run) as fp16
    assert cli("budget", "--model", "EleutherAI/pythia-12b", "--step", "sft", "--gpu", "24GiB") == 0
    assert "8bit, float16;" in capsys.readouterr().out
    assert cli("budget", "--model", "Qwen/Qwen2.5-7B", "--step", "sft", "--gpu", "24GiB", "model.dtype=float16") == 0
    assert "8bit, float16;" in capsys.readouterr().out  # said on the command line: the user's word wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans against RAM only where there is no GPU")
def test_a_cpu_plan_says_so_first(capsys):
    cli("budget", "--recipe", "quickstart", "--step", "sft")
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("memory budget: sft of fixture:tiny-gpt-neox") and "free RAM" in first, first
