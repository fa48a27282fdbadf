"""What an RL trainer does whatever its algorithm: one merged k-bit model as policy (LoRA) and reference (LoRA off),
the reward, prompts, the optimizer, the step loop with its non-finite guard, checkpoints and evaluation.

An algorithm (rlhf.ppo.trainer, rlhf.grpo.trainer) subclasses `RLTrainer` and gives `train_step` (one step on this
rank's prompts, None when the batch was skipped) and, where it has more to save than the adapter, the checkpoint
hooks `extra_tensors`, `extra_state` and `load_extra`.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod

import torch

from rlhf import modeling
from rlhf.config import DataConfig, Recipe
from rlhf.data import load_splits, load_texts
from rlhf.diversity import distinct_n
from rlhf.errors import UserError
from rlhf.io import trim_jsonl
from rlhf.rewards import RESERVED, Judged, load_reward, load_spec
from rlhf.rl import checkpoint
from rlhf.rl.evaluate import evaluate
from rlhf.rl.parallel import Parallel
from rlhf.rl.policy import Policy, ValueHead, disable_dropout
from rlhf.rl.prompts import DatasetPrompts, PromptBatch, Prompts
from rlhf.rl.reward import SharedBaseReward, check_same_base
from rlhf.rl.reward_files import reward_adapter_dir
from rlhf.rl.rollout import Rollout, collect
from rlhf.rl.telemetry import Log, Timer, peak_memory_bytes, progress
from rlhf.runs import Run


def hold_out(texts: list[str], n: int, data, section: str) -> tuple[list[str], list[str]]:
    """(training texts, the last `n` texts held out for evaluation); a training text equal to a held-out one is left
    out too, so no evaluation prompt is ever drawn in training."""
    if n == 0:
        return texts, []
    if len(texts) < 2:
        raise UserError(
            f"dataset '{data.dataset}' has no '{data.eval_split}' split and {len(texts)} '{data.train_split}' "
            f"document(s): too few to hold any out for evaluation; add a '{data.eval_split}' split or set "
            f"{section}.eval_prompts=0"
        )
    n = min(n, len(texts) // 2)
    held_out = texts[-n:]
    seen = set(held_out)
    return [t for t in texts[:-n] if t not in seen], held_out


class NonFiniteError(RuntimeError):
    """Too many non-finite batches in a row: the run stops (exit 1) with its last good checkpoint on disk."""

    exit_code = 1


class RLTrainer(ABC):
    name = "rl"  # the recipe section and the run's subdirectory: "ppo", "grpo"
    value_head = False
    kl_setting = ""  # the setting that holds the policy near the reference, named when the responses collapse
    # What to try when batches keep going non-finite, beyond the reward and fp16 overflow.
    nonfinite_hint = "the learning rate too high"

    def __init__(self, recipe: Recipe, run: Run, reward_name: str, parallel: Parallel, out=None):
        self.recipe, self.run, self.reward_name, self.parallel = recipe, run, reward_name, parallel
        self.out = out if out is not None else sys.stderr  # looked up now, not at import: redirections apply
        self.cfg = getattr(recipe, self.name)
        self.directory = run.root / self.name
        self.checkpoints = self.directory / "checkpoints"
        self.rank, self.world_size = parallel.rank, parallel.world_size
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.retries = 0
        self.timer = Timer()
        self.stop_requested = False
        self.early_stop: str | None = None
        self.log = Log(self.directory, self.name, parallel.is_main)
        self.component_keys: list[str] = []  # reward_NAME of each reward of a callable or weighted spec

    # --- setup ---
    def setup(self) -> None:
        torch.manual_seed(self.cfg.seed)  # the adapter's (and value head's) initial weights: the same on every rank
        reward_adapter, judge = reward_adapter_dir(self.reward_name), self.recipe.reward.judge
        if reward_adapter is not None:  # refused before the model loads when it was trained on another base
            check_same_base(reward_adapter, self.run.merged)
        if judge:
            load_spec(judge)  # an unknown judge fails now, before the model loads
        self._setup_model()
        if reward_adapter is not None:  # a learned reward: its adapter on the policy's own weights, no second model
            self.reward = SharedBaseReward(self.model, reward_adapter, self.tokenizer, self.cfg.rollout_batch_size)
        else:
            self.reward = load_reward(self.reward_name, self.recipe.reward.device)
        if judge:  # `positive` (the positive rate) from an independent classifier, the score from the reward
            self.reward = Judged(self.reward, load_reward(judge, self.recipe.reward.device))
        self._setup_data()
        self._setup_optimizer()

    def _setup_model(self) -> None:
        merged = self.run.merged
        model_cfg = self.recipe.model.model_copy(update={"name": str(merged.resolve())})
        self.tokenizer = modeling.load_tokenizer(merged, model_cfg.trust_remote_code)
        base = modeling.load_base(model_cfg, merged)
        modeling.prepare_for_training(base, self.cfg.gradient_checkpointing)
        self.model = modeling.add_lora(base, self.cfg.lora)
        disable_dropout(self.model)
        value_head = ValueHead(base.config.hidden_size).to(modeling.device()) if self.value_head else None
        self.policy = Policy(self.model, value_head, self.cfg.generation.temperature, compile=self.cfg.compile)
        self.params = self.policy.trainable_parameters()
        self.module = self.parallel.wrap(self.policy)  # DDP averages the trainable parameters' gradients

    def _setup_data(self) -> None:
        rows = self._prompt_rows()
        if rows is not None:
            self._setup_prompt_dataset(*rows)
            return
        data, cfg = self.recipe.data, self.cfg
        setting = f"{self.name}.prompt_min_chars"
        train = load_texts(data, data.train_split, min_chars=cfg.prompt_min_chars, setting=setting)
        self.held_out_of_train = 0
        try:
            held_out = load_texts(data, data.eval_split, min_chars=cfg.prompt_min_chars, setting=setting)
        except UserError:  # no eval split: the tail of train, which training then never draws from
            train, held_out = hold_out(train, cfg.eval_prompts, data, self.name)
            self.held_out_of_train = len(held_out)
            self.eval_source = f"{data.train_split} (last {len(held_out)}, held out of training)"
            if self.parallel.is_main and held_out:
                print(
                    f"{self.name}: no '{data.eval_split}' split in {data.dataset}: the last {len(held_out)} "
                    f"'{data.train_split}' documents are held out for evaluation; training draws from the other "
                    f"{len(train)}",
                    file=self.out,
                )
        else:
            self.eval_source = data.eval_split
        self.prompts = Prompts(
            train, self.tokenizer, cfg.prompt_min_tokens, cfg.prompt_max_tokens, cfg.seed, section=self.name
        )
        self.eval_texts = held_out[: cfg.eval_prompts]
        self.eval_prompts = Prompts(
            self.eval_texts or train[:1], self.tokenizer, cfg.prompt_min_tokens, cfg.prompt_max_tokens, cfg.seed + 1
        )

    def _prompt_rows(self) -> tuple[DataConfig, list[dict], list[dict] | None] | None:
        """(the dataset's config, its train rows, its eval rows or None) when the prompts come from a prompt column;
        None for a text corpus without one (the run's own data, as document prefixes)."""
        cfg, name = self.cfg, self.name
        if cfg.dataset is None:
            source = self.recipe.data
        else:
            source = DataConfig(dataset=cfg.dataset, config_name=cfg.config_name, train_split=cfg.train_split,
                                eval_split=cfg.eval_split)  # fmt: skip
        splits = load_splits(source)
        if source.train_split not in splits:
            raise UserError(
                f"dataset '{source.dataset}' has no split '{source.train_split}'; its splits are: "
                f"{', '.join(splits)} (set {name}.train_split)"
            )
        columns = splits[source.train_split].column_names
        if cfg.prompt_column not in columns:
            if cfg.dataset is None and cfg.prompt_column == "prompt":
                return None  # a text corpus: today's document-prefix prompts
            raise UserError(
                f"dataset '{source.dataset}' has no column '{cfg.prompt_column}' to take prompts from; its columns "
                f"are: {', '.join(columns)} (set {name}.prompt_column)"
            )
        held_out = splits[source.eval_split].to_list() if source.eval_split in splits else None
        return source, splits[source.train_split].to_list(), held_out

    def _setup_prompt_dataset(self, source: DataConfig, train: list[dict], held_out: list[dict] | None) -> None:
        """Prompts from a dataset column, each with its row; held-out prompts from the eval split, or else the last
        `eval_prompts` rows, which training then never draws from."""
        import json

        cfg, name, column = self.cfg, self.name, self.cfg.prompt_column
        self.held_out_of_train = 0
        if held_out is not None:
            self.eval_source = source.eval_split
        else:
            n = min(cfg.eval_prompts, len(train) // 2)
            if cfg.eval_prompts and n == 0:
                raise UserError(
                    f"dataset '{source.dataset}' has no '{source.eval_split}' split and {len(train)} row(s): too few "
                    f"to hold any out for evaluation; add a '{source.eval_split}' split or set {name}.eval_prompts=0"
                )
            held_out = train[len(train) - n :]
            seen = {json.dumps(row[column], sort_keys=True, default=str) for row in held_out}
            train = [
                r for r in train[: len(train) - n] if json.dumps(r[column], sort_keys=True, default=str) not in seen
            ]
            self.held_out_of_train = n
            self.eval_source = f"{source.train_split} (last {n}, held out of training)"
        model = self.recipe.model
        prompts = [
            DatasetPrompts(
                rows,
                column,
                self.tokenizer,
                cfg.max_prompt_tokens,
                seed,
                model.chat_template,
                model.name,
                f"dataset '{source.dataset}' split '{split}'",
            )  # fmt: skip
            for rows, seed, split in (
                (train, cfg.seed, source.train_split),
                (held_out[: cfg.eval_prompts], cfg.seed + 1, self.eval_source),
            )
        ]
        self.prompts, self.eval_prompts = prompts
        if not len(self.prompts):
            raise UserError(
                f"dataset '{source.dataset}': none of its {len(train)} training prompts is within "
                f"{name}.max_prompt_tokens={cfg.max_prompt_tokens} tokens; raise it"
            )
        completions = held_out[0].get("completion") if held_out else None
        self.eval_texts = [  # held-out text for the policy's perplexity: prompt and reference completion when given
            text + row["completion"] if isinstance(completions, str) else text
            for text, row in zip(self.eval_prompts.texts, self.eval_prompts.rows)
        ]
        if self.parallel.is_main:
            kind = "chat messages rendered with the chat template" if self.prompts.conversational else "text"
            too_long = self.prompts.n_too_long + self.eval_prompts.n_too_long
            cut = (
                f"; {too_long} longer than {name}.max_prompt_tokens={cfg.max_prompt_tokens} tokens left out"
                if too_long
                else ""
            )
            passed = [c for c in self.prompts.columns if c != column and c not in RESERVED]
            print(
                f"{name}: prompts from column '{column}' of {source.dataset} ({kind}): {len(self.prompts)} to train "
                f"on, {len(self.eval_prompts)} held out ({self.eval_source}){cut}; the reward also receives "
                f"{', '.join(passed) or 'no other column'}",
                file=self.out,
            )

    def _setup_optimizer(self) -> None:
        if self.cfg.optimizer == "adam_8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.Adam8bit(self.params, lr=self.cfg.learning_rate)
        else:
            self.optimizer = torch.optim.Adam(self.params, lr=self.cfg.learning_rate)

    # --- rollouts ---
    def collect(self, batch: PromptBatch, repeat: int, seed: int) -> Rollout:
        """Generate and reward `repeat` samples of each prompt of the batch (a prompt's row goes with each sample).
        A reward's error on one rank stops every rank: the others would wait for it in the next collective."""
        cfg = self.cfg
        rows = None if batch.rows is None else [row for row in batch.rows for _ in range(repeat)]
        error, rollout = None, None
        try:
            rollout = collect(
                self.policy, self.tokenizer, self.reward, [p for p in batch.tokens for _ in range(repeat)],
                cfg.generation, cfg.rollout_batch_size, seed, self.timer, rows=rows, prompt_column=cfg.prompt_column,
            )  # fmt: skip
        except UserError as exc:
            error = exc
        if not self.parallel.all_true(error is None):
            raise error or UserError(f"{self.name}: the reward failed on another process; its message is above")
        return rollout

    # --- metrics ---
    def reward_metrics(self, rollout: Rollout, all_scores: torch.Tensor, all_positive: torch.Tensor) -> dict:
        """The reward of the step's samples over every rank (its first columns in metrics.jsonl), then each reward
        of the spec on its own (`reward_NAME`: its mean over the samples it applies to)."""
        row = {
            "reward_mean": all_scores.mean().item(),
            "reward_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
            "positive_rate": all_positive.mean().item(),
        }
        for name, values in (rollout.components or {}).items():
            values = self.parallel.gather(values.float().to(all_scores.device))
            applies = ~torch.isnan(values)
            key = f"reward_{name}"
            row[key] = values[applies].mean().item() if applies.any() else None
            if key not in self.component_keys:
                self.component_keys.append(key)
        return row

    def step_metrics(self, rollout, stats: dict, elapsed: float) -> dict:
        """What every RL step logs after its algorithm's own columns: the update's gradient and first-ratio stats,
        the responses (entropy, diversity, length), throughput and where the step's time went."""
        n_tokens = float(rollout.response_mask.sum().item())
        all_tokens = self.parallel.sum(n_tokens)
        entropy_sum = float(torch.where(rollout.response_mask.bool(), rollout.entropy, 0.0).sum().item())
        return {
            "grad_norm": stats["grad_norm"],
            "first_ratio": stats["first_ratio"],
            "first_approx_kl": stats["first_approx_kl"],
            "first_clipfrac": stats["first_clipfrac"],
            "entropy": self.parallel.sum(entropy_sum) / all_tokens,  # per response token, over every rank
            "distinct_2": self.parallel.mean(distinct_n(rollout.responses, 2)),
            "response_len": all_tokens / (len(rollout.prompts) * self.world_size),
            # Response tokens per second of the whole step (generation, scoring and update), all ranks together.
            "tokens_per_s": self.parallel.mean(n_tokens / elapsed) * self.world_size,
            "generate_share": self.timer.seconds.get("generate", 0.0) / elapsed,
            "peak_mem_bytes": peak_memory_bytes(),
            "nonfinite_skipped": self.nonfinite_total,  # batches and mini-batches skipped so far
            **{f"time_{k}": v for k, v in self.timer.seconds.items()},
            "time_step": elapsed,
        }

    # --- the loop ---
    @abstractmethod
    def train_step(self) -> dict | None:
        """One step of the algorithm on this rank's prompts: its metrics row, or None when the batch was skipped."""

    def train(self) -> None:
        cfg = self.cfg
        if self.step == 0:  # what a roll-back before the first checkpoint goes back to (value head, controllers)
            self.initial = (
                {name: {k: v.detach().cpu().clone() for k, v in t.items()} for name, t in self.extra_tensors().items()},
                self.extra_state(),
            )
        bar = self.bar = progress(self.name, cfg.max_steps, self.step, self.parallel.is_main)
        while self.step < cfg.max_steps and not self.stop_requested:
            row = self.train_step()
            if row is None:
                continue
            bar.update(1)
            # Each reward of a weighted spec on its own (one reward alone is the reward column already).
            keys = self.component_keys if len(self.component_keys) > 1 else []
            each = {k.removeprefix("reward_"): f"{row[k]:.2f}" for k in keys if row.get(k) is not None}
            bar.set_postfix(
                reward=f"{row['reward_mean']:.2f}", **each, kl=f"{row['kl']:.2f}", pos=f"{row['positive_rate']:.2f}",
                tok_s=f"{row['tokens_per_s']:.0f}", gen=f"{100 * row['generate_share']:.0f}%",
            )  # fmt: skip
            self.early_stop = self._guard(row)
            if self.early_stop:
                bar.close()
                self._roll_back()
                return
            if self.world_size > 1:  # Ctrl-C may reach the ranks at different steps: all stop at the same one
                self.stop_requested = not self.parallel.all_true(not self.stop_requested)
            if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps or self.stop_requested:
                self.save_checkpoint()
        bar.close()

    def _guard(self, row: dict) -> str | None:
        """Why to stop early (kl_ceiling, diversity_floor of the step's section), or None. Every rank computes the
        same metrics."""
        cfg, name = self.cfg, self.cfg.section
        if row["step"] == 1 or not hasattr(self, "first_distinct_2"):
            self.first_distinct_2 = row["distinct_2"]
        if cfg.kl_ceiling is not None and row["kl"] > cfg.kl_ceiling:
            return f"KL {row['kl']:.2f} passed {name}.kl_ceiling {cfg.kl_ceiling:g} at step {row['step']}"
        floor = cfg.diversity_floor
        if floor is not None and row["distinct_2"] < floor * self.first_distinct_2:
            return (
                f"the responses' distinct-2 fell to {row['distinct_2']:.2f}, below {name}.diversity_floor {floor:g} x "
                f"{self.first_distinct_2:.2f} (step 1) at step {row['step']}"
            )
        return None

    def _roll_back(self) -> None:
        """Back to the last checkpoint saved before the guard fired (or to the start): the policy that is saved and
        evaluated is the last good one."""
        kept = checkpoint.saved_steps(self.checkpoints)
        before = f"the policy before {self.name.upper()}"
        where = f"the checkpoint of step {checkpoint.step_of(kept[-1])}" if kept else before
        if self.parallel.is_main:
            print(f"{self.name}: stopped early: {self.early_stop}; going back to {where}", file=self.out)
        if kept:
            self.load_checkpoint()
        else:  # nothing saved yet: the adapter as it was created (B = 0), i.e. the reference, and the rest as it was
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.data.zero_()
            self.load_extra(*self.initial)
            self.step = 0
        if self.parallel.is_main:  # the log describes the policy that is saved: the rolled-back steps' rows go
            trim_jsonl(self.log.metrics_path, self.step)
            trim_jsonl(self.log.samples_path, self.step)

    def nonfinite(self, what: str) -> None:
        """Count a skipped batch; stop (NonFiniteError) after `nonfinite_patience` in a row."""
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.parallel.is_main:
            print(
                f"{self.name}: warning: non-finite {what} at step {self.step + 1}; batch skipped "
                f"({self.nonfinite_in_a_row} in a row)",
                file=self.out,
            )
        if self.nonfinite_in_a_row >= self.cfg.nonfinite_patience:
            saved = checkpoint.saved_steps(self.checkpoints)
            kept = f"the last good checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint was saved yet"
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} batches in a row had a non-finite {what}; stopped at step {self.step} "
                f"({kept}). Likely causes: a reward model or function returning NaN/inf, fp16 overflow "
                f"(model.dtype=bfloat16), "
                f"{self.nonfinite_hint}"
            )
        self.retries += 1  # the next attempt must not replay the same random draws

    # --- checkpoints ---
    def extra_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trainable tensors besides the adapter, by file name (PPO: the value head)."""
        return {}

    def extra_state(self) -> dict:
        """JSON-able state besides the step counters (PPO: the KL controller, the score statistics)."""
        return {}

    def load_extra(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None:  # noqa: B027 - a hook
        """Restore what `extra_tensors` and `extra_state` saved (nothing, for an algorithm that saves nothing else)."""

    def settings(self) -> dict:
        """What the trajectory depends on; a resume must not change it silently."""
        return {
            self.name: self.cfg.model_dump(mode="json"),
            "reward": self.reward_name,
            # Without an eval split, eval_prompts sets how much of train is held out, so the prompts training draws.
            "held_out_of_train": self.held_out_of_train,
            # Each rank's prompts are a function of (seed, step, rank, world size): another count draws others.
            "world_size": self.world_size,
        }

    def save_checkpoint(self) -> None:
        from peft import get_peft_model_state_dict

        if self.parallel.is_main:
            adapter = {k: v.detach().float() for k, v in get_peft_model_state_dict(self.model).items()}
            state = {
                **self.extra_state(),
                "nonfinite_total": self.nonfinite_total,
                "first_distinct_2": getattr(self, "first_distinct_2", None),
                "settings": self.settings(),
            }
            checkpoint.save(self.checkpoints, self.step, {"adapter": adapter, **self.extra_tensors()}, self.optimizer,
                            state)  # fmt: skip
        self.parallel.barrier()  # no rank races ahead of a checkpoint that rank 0 is still writing or pruning

    def load_checkpoint(self) -> dict:
        """Restore the newest readable checkpoint; returns its state.json."""
        from peft import set_peft_model_state_dict

        if self.parallel.is_main:
            checkpoint.remove_partial(self.checkpoints, self.directory / "adapter")
        self.parallel.barrier()
        names = ("adapter", *self.extra_tensors())
        tensors, optimizer, state = checkpoint.load_newest(
            self.checkpoints, names, lambda m: print(f"{self.name}: warning: {m}", file=self.out)
        )
        device = modeling.device()
        set_peft_model_state_dict(self.model, {k: v.to(device) for k, v in tensors["adapter"].items()})
        self.optimizer.load_state_dict(optimizer)
        for group in self.optimizer.param_groups:  # load_state_dict restores the saved rate; `--force` may change it
            group["lr"] = self.cfg.learning_rate
        self.load_extra(tensors, state)
        self.nonfinite_total = state.get("nonfinite_total", 0)
        if state.get("first_distinct_2") is not None:  # the diversity guard's baseline stays that of step 1
            self.first_distinct_2 = state["first_distinct_2"]
        self.step = int(state["step"])
        return state

    def evaluate(self) -> dict:
        cfg = self.cfg
        return evaluate(
            self.policy, self.tokenizer, self.reward, self.eval_prompts, self.eval_texts, cfg.generation,
            cfg.rollout_batch_size, cfg.seed + 12345, cfg.prompt_column,
        )  # fmt: skip
