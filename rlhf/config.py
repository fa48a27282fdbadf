"""The recipe: a typed, nested configuration loaded strictly.

A recipe is a YAML file with the sections below. Loading is strict: an unknown key, a wrong type or an out-of-range
value is an error that names the key, the section and what is allowed, and every problem is reported at once.
`KEY=VALUE` overrides address any field by its dotted path (`ppo.mini_batch_size=8`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field("EleutherAI/gpt-neox-20b", min_length=1, description="hub id, local directory, or fixture:NAME")
    revision: str | None = None
    quantization: Literal["8bit", "4bit", "none"] = "8bit"
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of everything that is not quantized (embeddings, norms); LoRA and heads are fp32"
    )
    llm_int8_threshold: float = Field(6.0, ge=0.0)
    trust_remote_code: bool = False
    chat_template: str | None = Field(
        None,
        description="for conversational data: chatml, a .jinja file, or the template text; wins over the tokenizer's",
    )


class LoraConfig(Section):
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "auto",
        description="auto: the model family's default (rlhf.targets); all-linear: every linear layer but the output "
        "head; or a list of layer names",
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        """A keyword, or layer names; `lora.target_modules=q_proj,v_proj` on the command line arrives as one string."""
        if isinstance(value, str) and value.strip().lower() in ("auto", "all-linear"):
            return value.strip().lower()
        names = value.split(",") if isinstance(value, str) else value
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            names = [n.strip() for n in names if n.strip()]
            if names:
                return names
        raise ValueError(f"must be auto, all-linear or a list of layer names such as [q_proj, v_proj], not {value!r}")


class DataConfig(Section):
    dataset: str = Field("stanfordnlp/imdb", min_length=1, description="hub id, local file or dir, or fixture:NAME")
    config_name: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    text_column: str = "text"
    format: Literal["auto", "text", "prompt-completion", "messages"] = Field(
        "auto",
        description="SFT rows: auto picks prompt+completion, then messages, then text_column; the loss counts only the "
        "completion / assistant tokens of the first two",
    )
    min_chars: int = Field(0, ge=0, description="drop documents shorter than this many characters")
    max_documents: int | None = Field(None, ge=1, description="use only the first N documents (after filtering)")


class SftConfig(Section):
    block_size: int = Field(1024, ge=8)
    pack: bool = Field(True, description="join documents with EOS and cut into blocks; false: one document a block")
    batch_size: int = Field(1, ge=1, description="micro-batch per device")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int = Field(2, ge=1)
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    seed: int = 0


class MergeConfig(Section):
    dtype: Literal["float16", "bfloat16"] = "float16"
    max_shard_size: str = "2GB"
    tolerance: float = Field(5e-2, gt=0, description="max |merged - (base + adapter)| logit difference allowed")
    # An adapter trained on an NF4 base learned against the dequantized weights; `dequantized` merges it into those
    # (every layer bitsandbytes quantized, rounded through NF4 as the training load did), `original` into the
    # checkpoint's own. Measured differences: docs/memory.md.
    base_weights: Literal["original", "dequantized"] = Field(
        "original", description="merge into the original weights, or (after 4-bit sft) into their NF4 dequantization"
    )


class GenerationConfig(Section):
    min_new_tokens: int = Field(4, ge=1, description="response lengths are drawn uniformly from [min, max]")
    max_new_tokens: int = Field(16, ge=1)
    # RL scores each sample under the policy's full distribution (the PPO ratio, the KL): samples drawn from a
    # top-k/top-p truncated one would be scored under the wrong distribution, so only the full one is accepted.
    top_k: int = Field(0, ge=0, description="must be 0: RL samples from the whole distribution")
    top_p: float = Field(1.0, gt=0, le=1, description="must be 1.0: RL samples from the whole distribution")
    temperature: float = Field(1.0, gt=0)
    stop_at_eos: bool = Field(False, description="false: responses run to their drawn length even past EOS")

    @model_validator(mode="after")
    def _lengths(self) -> GenerationConfig:
        problems = []
        if self.min_new_tokens > self.max_new_tokens:
            problems.append(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
        if self.top_k != 0 or self.top_p != 1.0:
            problems.append(
                f"top_k ({self.top_k}) must be 0 and top_p ({self.top_p}) 1.0: RL scores each sample under the "
                f"policy's full distribution, so samples from a truncated one would make the ratio and the KL wrong"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RLConfig(Section):
    """What every RL step after merge (ppo, grpo) is set by besides its algorithm: prompts, generation, the policy
    LoRA, the optimizer, checkpoints, evaluation and the guards against over-optimisation."""

    section: ClassVar[str] = "rl"
    learning_rate: float = Field(1.41e-5, gt=0)
    optimizer: Literal["adam", "adam_8bit"] = "adam"
    max_grad_norm: float | None = Field(None, gt=0)
    entropy_coef: float = Field(
        0.0, ge=0, description="bonus on the policy's mean token entropy in the loss: keeps responses varied"
    )
    dataset: str | None = Field(
        None,
        description="prompts for RL: hub id, local file or dir, or fixture:NAME; default: the run's data "
        "(data.dataset): its prompt column where it has one, else the first tokens of its documents",
    )
    config_name: str | None = Field(None, description="the dataset's configuration (e.g. main for openai/gsm8k)")
    train_split: str = Field("train", description="of `dataset`; the run's data uses data.train_split")
    eval_split: str = Field(
        "test", description="held-out prompts; without it, the last eval_prompts rows, which training never draws"
    )
    prompt_column: str = Field(
        "prompt", description="the column of `dataset` holding each prompt (a string or a list of {role, content})"
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="prompts longer than this many tokens (after the chat template) are left out, counted"
    )
    # Document-prefix prompts (a text corpus without a prompt column): the first k tokens, k drawn in [min, max].
    prompt_min_tokens: int = Field(2, ge=1)
    prompt_max_tokens: int = Field(8, ge=1)
    prompt_min_chars: int = Field(200, ge=0, description="only documents longer than this become prompts")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(dropout=0.0))
    gradient_checkpointing: bool = True
    compile: bool = Field(
        False,
        description="torch.compile the scoring and update passes (not generation): each kind of pass compiles once, "
        "tens of seconds on a CPU, then runs faster where per-operation overhead dominates (small models); for long "
        "runs",
    )
    save_steps: int = Field(10, ge=1)
    sample_every: int = Field(5, ge=1)
    eval_prompts: int = Field(64, ge=0)
    nonfinite_patience: int = Field(3, ge=1, description="stop after this many non-finite batches in a row")
    # Guards against reward over-optimisation: stop early, keeping the last checkpoint saved before the guard fired.
    kl_ceiling: float | None = Field(None, gt=0, description="stop when a step's mean KL to the reference passes this")
    diversity_floor: float | None = Field(
        None, gt=0, le=1, description="stop when a step's distinct-2 falls below this share of the first step's"
    )
    seed: int = 0

    def common_problems(self) -> list[str]:
        """The problems every RL section can have; each section's validator reports them with its own, at once."""
        problems = []
        if self.prompt_min_tokens > self.prompt_max_tokens:
            problems.append(
                f"prompt_min_tokens ({self.prompt_min_tokens}) must be <= prompt_max_tokens ({self.prompt_max_tokens})"
            )
        if self.lora.dropout > 0:
            problems.append(
                f"lora.dropout ({self.lora.dropout}) must be 0: {self.section.upper()} scores its old log-probs and "
                f"the reference with the model in train mode, and dropout would make them random samples"
            )
        return problems


class PpoConfig(RLConfig):
    section: ClassVar[str] = "ppo"  # the recipe key, for messages that name a setting
    batch_size: int = Field(256, ge=1, description="prompts per PPO step")
    mini_batch_size: int = Field(16, ge=1, description="sequences per optimizer step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per mini-batch")
    rollout_batch_size: int = Field(64, ge=1, description="sequences generated and scored at once (memory)")
    ppo_epochs: int = Field(4, ge=1)
    max_steps: int = Field(100, ge=1, description="PPO steps (batches of prompts)")
    init_kl_coef: float = Field(0.2, ge=0)
    adaptive_kl: bool = True
    target_kl: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, ge=1)
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = "k1"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_advantages: bool = True
    score_clip: float | None = Field(None, gt=0)
    score_scale: float = 1.0
    score_norm: bool = False

    @model_validator(mode="after")
    def _batches(self) -> PpoConfig:
        problems = []
        if self.mini_batch_size > self.batch_size:
            problems.append(f"mini_batch_size ({self.mini_batch_size}) must be <= batch_size ({self.batch_size})")
        elif self.batch_size % self.mini_batch_size:
            problems.append(
                f"batch_size ({self.batch_size}) must be exactly divisible by mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            problems.append(
                f"mini_batch_size ({self.mini_batch_size}) must be exactly divisible by "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        problems += self.common_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self


class GrpoConfig(RLConfig):
    """Critic-free RL (`rlhf grpo`): each prompt is sampled `group_size` times and each sample's advantage is its score
    against the others of its group, so no value head is trained."""

    section: ClassVar[str] = "grpo"
    group_size: int = Field(8, ge=1, description="samples per prompt; the group is each sample's baseline")
    advantage: Literal["grpo", "rloo"] = Field(
        "grpo", description="grpo: (score - group mean) / group std; rloo: score - mean of the other samples"
    )
    beta: float = Field(0.04, ge=0, description="coefficient of KL(policy || reference); 0: no KL term")
    kl_in: Literal["loss", "reward"] = Field(
        "loss", description="loss: beta x k3 per token in the loss (GRPO); reward: score - beta x KL (RLOO)"
    )
    batch_size: int = Field(32, ge=1, description="prompts per step (x group_size sequences)")
    mini_batch_size: int = Field(64, ge=1, description="sequences per optimizer step")
    gradient_accumulation_steps: int = Field(4, ge=1, description="micro-batches per mini-batch")
    rollout_batch_size: int = Field(64, ge=1, description="sequences generated and scored at once (memory)")
    epochs: int = Field(1, ge=1, description="passes over each step's samples; the clipped ratio acts after the first")
    cliprange: float = Field(0.2, gt=0)
    max_steps: int = Field(100, ge=1, description="steps (batches of prompts)")

    @model_validator(mode="after")
    def _groups(self) -> GrpoConfig:
        problems = []
        if self.group_size < 2:
            baseline = {
                "grpo": "each sample is measured against the mean and spread of its prompt's group",
                "rloo": "each sample's baseline is the mean of the other samples of its prompt",
            }[self.advantage]
            problems.append(
                f"group_size ({self.group_size}) must be at least 2 with advantage={self.advantage}: {baseline}, "
                f"and a group of one has none (try group_size=4)"
            )
        sequences = self.batch_size * self.group_size
        if self.mini_batch_size > sequences:
            problems.append(
                f"mini_batch_size ({self.mini_batch_size}) must be <= batch_size x group_size "
                f"({self.batch_size} x {self.group_size} = {sequences} sequences)"
            )
        elif sequences % self.mini_batch_size:
            problems.append(
                f"batch_size x group_size ({self.batch_size} x {self.group_size} = {sequences} sequences) must be "
                f"exactly divisible by mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            problems.append(
                f"mini_batch_size ({self.mini_batch_size}) must be exactly divisible by "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if self.kl_in == "reward" and self.advantage == "grpo" and self.beta > 0:
            # GRPO's advantage divides by the group's score spread, the KL penalty included: beta would weigh the KL
            # differently in every group (trl offers the KL in the reward for RLOO only).
            problems.append(
                "kl_in=reward with advantage=grpo divides beta x KL by each group's score spread, so beta loses its "
                "meaning; use advantage=rloo with kl_in=reward, or kl_in=loss with advantage=grpo"
            )
        problems += self.common_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RewardConfig(Section):
    name: str = Field(
        "imdb-sentiment", description="a reward_models/NAME.yaml, a path to such a file, or a RUN/reward directory"
    )
    judge: str | None = Field(
        None,
        description="a reward spec whose classifier decides `positive` (the positive rate) while the score comes "
        "from `name`: an independent judge for a learned reward",
    )
    device: Literal["auto", "cpu", "cuda"] | None = Field(
        None, description="where a classifier reward (and judge) runs; overrides the spec's device (cpu frees the GPU)"
    )


class PreferenceData(Section):
    """Preference pairs as `rlhf.preferences` reads them, shared by `rlhf reward` and `rlhf dpo` (its fields come
    first in both sections)."""

    dataset: str = Field(
        "Anthropic/hh-rlhf", min_length=1, description="preference pairs: hub id, local file or dir, or fixture:NAME"
    )
    config_name: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    prompt_column: str = Field(
        "prompt",
        description="optional: when present, each side is prompt + answer; without it the pair's shared "
        "beginning is the prompt",
    )
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_pairs: int | None = Field(None, ge=1, description="train on only the first N pairs")
    skip_identical_pairs: bool = Field(
        False, description="leave out pairs whose chosen and rejected answers are the same (default: refuse them)"
    )
    eval_pairs: int = Field(500, ge=1, description="held-out pairs measured before and after training")


class RewardModelConfig(PreferenceData):
    """`rlhf reward`: a reward model learned from preference pairs, a LoRA adapter + score head on the merged model."""

    max_length: int = Field(512, ge=8, description="tokens per side; longer pairs are left out (counted)")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # 2 pairs = 4 x 512 tokens a forward: gpt-neox-20b's activations then fit 24 GiB beside its 8-bit weights.
    batch_size: int = Field(2, ge=1, description="pairs per micro-batch (each pair is two sequences)")
    gradient_accumulation_steps: int = Field(8, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["linear", "constant"] = "linear"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    max_grad_norm: float = Field(1.0, gt=0)
    margin: float = Field(0.0, ge=0, description="loss -log sigmoid(r_chosen - r_rejected - margin)")
    score_penalty: float = Field(0.0, ge=0, description="+ this x mean score^2: keeps the scores near 0")
    gradient_checkpointing: bool = True
    save_steps: int = Field(100, ge=1)
    seed: int = 0


class DpoConfig(PreferenceData):
    """`rlhf dpo`: direct preference optimisation after merge, a new LoRA on the merged model trained on preference
    pairs; the reference is the same model with that adapter disabled. No reward model, no sampling in the loop."""

    max_length: int = Field(512, ge=8, description="tokens per side (prompt + answer); longer pairs are left out")
    max_prompt_length: int | None = Field(
        None, ge=1, description="keep only the last N tokens of a longer prompt (None: the whole prompt)"
    )
    add_eos: bool = Field(
        True,
        description="end each answer with EOS, as TRL does (the model learns where answers end); false for answers "
        "that are fragments cut anywhere, where an EOS would teach endings the data does not mean",
    )
    loss_type: Literal["sigmoid", "ipo", "robust"] = Field(
        "sigmoid",
        description="sigmoid: DPO, -log sigmoid(beta x margin) (with label_smoothing: conservative DPO); ipo: "
        "(per-token margin - 1/(2 beta))^2; robust: DPO unbiased for preferences flipped with probability "
        "label_smoothing",
    )
    beta: float = Field(0.1, gt=0, description="how far from the reference the policy may go: smaller goes further")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="the assumed share of flipped preferences (sigmoid, robust; not ipo)"
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="+ this x the chosen answers' NLL per token (RPO; trl: loss_type [sigmoid, sft]): DPO alone lowers "
        "the likelihood of chosen answers too, this keeps them likely",
    )
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig(dropout=0.0))
    # 2 pairs = 4 x 512 tokens a forward, as rlhf reward: gpt-neox-20b's activations fit 24 GiB beside its weights.
    batch_size: int = Field(2, ge=1, description="pairs per micro-batch (each pair is two sequences)")
    gradient_accumulation_steps: int = Field(8, ge=1)
    learning_rate: float = Field(5e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["linear", "constant"] = "linear"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    save_steps: int = Field(100, ge=1)
    seed: int = 0
    # Generations before and after, judged by a reward spec (the quickstart's sentiment classifier): PPO's eval keys.
    judge: str | None = Field(
        None,
        description="a reward spec that judges generations for held-out prompts before and after; None: no "
        "generation eval",
    )
    eval_prompts: int = Field(64, ge=0, description="held-out prompts from data.dataset generated for the judge")
    prompt_min_tokens: int = Field(2, ge=1)
    prompt_max_tokens: int = Field(8, ge=1)
    prompt_min_chars: int = Field(200, ge=0)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    rollout_batch_size: int = Field(64, ge=1, description="prompts generated and judged at once (memory)")

    @model_validator(mode="after")
    def _settings(self) -> DpoConfig:
        problems = []
        if self.loss_type == "ipo" and self.label_smoothing:
            problems.append(
                f"label_smoothing ({self.label_smoothing}) must be 0 with loss_type=ipo: IPO's squared loss has no "
                f"flipped-label term (use loss_type=sigmoid or robust for noisy preferences)"
            )
        if self.prompt_min_tokens > self.prompt_max_tokens:
            problems.append(
                f"prompt_min_tokens ({self.prompt_min_tokens}) must be <= prompt_max_tokens ({self.prompt_max_tokens})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class BudgetConfig(Section):
    gpu: str | None = Field(None, description="memory to plan against when not running here: rtx4090, 24GiB, ...")


class Recipe(Section):
    name: str = "custom"
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    ppo: PpoConfig = Field(default_factory=PpoConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading ----------------------------------------------------------------------------------------------------


def shipped_dir(name: str) -> Path:
    """A folder shipped with rlhf: inside the wheel (rlhf/NAME) or, in a source checkout, the repository's NAME/."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    return PACKAGE_DIR / name


def recipes_dir() -> Path:
    return shipped_dir("recipes")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def find_recipe(name_or_path: str) -> Path | None:
    """A path to a YAML file, or the name of a shipped recipe; None when neither exists."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file() and "/" not in name_or_path:
        return shipped
    return None


def _model_for(path: tuple[str, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    model: type[BaseModel] = root or Recipe
    for key in path:
        field = model.model_fields.get(key)
        if field is None:
            return None
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _did_you_mean(section: tuple[str, ...], name: str, model: type[BaseModel] | None, root) -> str:
    """' (did you mean sft.max_steps?)': the same key in a section, for a key given without one (max_steps=5), or a
    close spelling in its own section (lora.rnak)."""
    import difflib

    if not section and (root or Recipe) is Recipe:
        owners = [
            f"{field}.{name}"
            for field, info in Recipe.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
            and name in info.annotation.model_fields
        ]  # fmt: skip
        if owners:
            listed = ", ".join(owners[:-1]) + f" or {owners[-1]}" if len(owners) > 1 else owners[0]
            return f" (did you mean {listed}?)"
    close = difflib.get_close_matches(name, list(model.model_fields) if model else [], n=1)
    return f" (did you mean '{'.'.join((*section, close[0]))}'?)" if close else ""


def _describe(error: dict[str, Any], root: type[BaseModel] | None = None) -> str:
    """One validation error as a sentence; `root` is the model validated (default: the Recipe)."""
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        section = loc[:-1]
        model = _model_for(section, root)
        valid = ", ".join(model.model_fields) if model else "?"
        where = f"section '{'.'.join(section)}'" if section else "the top level"
        hint = _did_you_mean(section, loc[-1], model, root)
        return f"unknown key '{key}'{hint}; valid keys in {where}: {valid}"
    if kind == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        return f"'{key}': {message}" if key else message
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    if kind == "literal_error":
        return f"'{key}' is {shown}; {error['msg'].lower()}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"'{key}' is {shown}, which is not valid: {error['msg'].lower()}"
    return f"'{key}' is {shown}: {error['msg'].lower()}"


def validate(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a Recipe from a mapping; all problems become one UserError."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        if len(problems) == 1:
            raise UserError(f"{source}: {problems[0]}") from None
        raise UserError(f"{source} has {len(problems)} problems: " + "; ".join(problems)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"cannot read '{item}': overrides are KEY=VALUE, e.g. ppo.mini_batch_size=8")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"cannot read '{item}': overrides are KEY=VALUE with a dotted key, e.g. lora.rank=8")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


# Recipe values that may name a local file or directory: read relative to the recipe file's folder (a command-line
# override: the current directory), and stored absolute, so that a run does not depend on where it was started.
PATH_KEYS = {("model", "name"), ("reward", "name"), ("reward", "judge")}


def is_path_key(path: tuple[str, ...] | list[str]) -> bool:
    path = tuple(path)
    return path in PATH_KEYS or (len(path) == 2 and path[1] == "dataset")


def resolve_path(value: Any, *bases: Path) -> Any:
    """`value` as an absolute path when it names an existing file or directory relative to one of `bases` (first
    match wins; ~ expanded); anything else (a hub id, fixture:NAME, a shipped name, a missing path) unchanged."""
    if not isinstance(value, str) or not value or value.startswith("fixture:") or "\n" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path) if path.exists() else value
    for base in bases:
        candidate = base / path
        if candidate.exists():
            return str(candidate.resolve())
    return value


def resolve_paths(raw: dict[str, Any], *bases: Path) -> dict[str, Any]:
    """Every path-valued key of a raw recipe (PATH_KEYS, any section's `dataset`) resolved by `resolve_path`."""
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if is_path_key((section, key)):
                    values[key] = resolve_path(value, *bases)
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted KEY=VALUE in the raw mapping; unknown keys are left for validation to report together. A path
    given on the command line is read from the current directory."""
    for item in overrides:
        path, value = parse_override(item)
        if is_path_key(path):
            value = resolve_path(value, Path.cwd())
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                dotted = ".".join(path[: depth + 1])
                raise UserError(f"cannot set '{'.'.join(path)}': '{dotted}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: Path, what: str = "a recipe (model:, lora:, ... sections)") -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: malformed YAML ({problem}); fix the file and run again") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file (UTF-8); pass {what} in YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a mapping of keys (key: value), not {type(data).__name__}")
    return data


def load_recipe(name_or_path: str | None, overrides: list[str] | None = None) -> Recipe:
    """Load a shipped recipe by name, or a recipe file, apply overrides, and validate strictly."""
    raw: dict[str, Any] = {}
    source = "recipe"
    if name_or_path is not None:
        path = find_recipe(name_or_path)
        if path is None:
            raise UserError(
                f"no recipe '{name_or_path}': not a file, and not one of the shipped recipes "
                f"({', '.join(available_recipes())})"
            )
        raw = read_yaml(path)
        if raw:
            resolve_paths(raw, path.resolve().parent, Path.cwd())
        if not raw:
            raise UserError(
                f"recipe file {path} is empty; set at least model: and data: (copy recipes/quickstart.yaml to start), "
                f"or pass a shipped recipe: {', '.join(available_recipes())}"
            )
        source = str(path) if path.parent != recipes_dir() else f"recipe '{path.stem}'"
        raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, source)
