"""The memory budget: exact parameter counts, each component's formula worked by hand on a small config, the verdict
at its boundary, ranked and re-estimated suggestions, the JSON contract, and the gpt-neox-20b done-when checks.

Offline and fast: shapes come from config.json files (shipped ones, or written here) instantiated on the meta device.
"""

from __future__ import annotations

import io
import json

import pytest

from rlhf import budget
from rlhf.budget import moments, peak
from rlhf.config import (
    BudgetConfig,
    GenerationConfig,
    GrpoConfig,
    LoraConfig,
    ModelConfig,
    PpoConfig,
    Recipe,
    RewardModelConfig,
    SftConfig,
    load_recipe,
)
from rlhf.errors import DoesNotFit, UserError
from rlhf.units import GiB, MiB

NEOX_20B = 20_554_567_680
CONTEXT = 500 * MiB  # budget.CUDA_CONTEXT
CPU_REWARD = {"model": "lvwerra/distilbert-imdb", "batch_size": 16, "device": "cpu", "max_length": 512}


@pytest.fixture(scope="module")
def neox20b() -> Recipe:
    return load_recipe("gpt-neox-20b")


# A GPT-NeoX small enough to work every number out by hand: h=64, 2 layers, 4 heads (head_dim 16), i=256, V=1000.
SMALL = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "hidden_act": "gelu",
    "torch_dtype": "float16",
}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small-neox")
    (path / "config.json").write_text(json.dumps(SMALL))
    return path


def small_recipe(path, **sft) -> Recipe:
    return Recipe(
        model=ModelConfig(name=str(path), quantization="8bit", dtype="float16"),
        lora=LoraConfig(rank=8, alpha=16, dropout=0.05, target_modules=["query_key_value"]),
        sft=SftConfig(**{"batch_size": 2, "block_size": 32, "gradient_checkpointing": True, **sft}),
        ppo=PpoConfig(
            batch_size=64,
            mini_batch_size=8,
            gradient_accumulation_steps=8,
            rollout_batch_size=64,
            prompt_min_tokens=4,
            prompt_max_tokens=4,
            generation=GenerationConfig(min_new_tokens=8, max_new_tokens=8),
            lora=LoraConfig(rank=8, alpha=16, dropout=0.0, target_modules=["query_key_value"]),
        ),
        # PPO's shapes with 8 prompts x 8 samples for its 64 sequences
        grpo=GrpoConfig(
            batch_size=8,
            group_size=8,
            mini_batch_size=8,
            gradient_accumulation_steps=8,
            rollout_batch_size=128,
            prompt_min_tokens=4,
            prompt_max_tokens=4,
            generation=GenerationConfig(min_new_tokens=8, max_new_tokens=8),
            lora=LoraConfig(rank=8, alpha=16, dropout=0.0, target_modules=["query_key_value"]),
        ),
    )


# --- shapes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind, params",
    [
        ("EleutherAI/gpt-neox-20b", "causal-lm", NEOX_20B),
        ("EleutherAI/pythia-160m", "causal-lm", 162_322_944),
        ("EleutherAI/pythia-1.4b", "causal-lm", 1_414_647_808),
        ("lvwerra/distilbert-imdb", "sequence-classification", 66_955_010),
    ],
)
def test_shipped_configs_give_exact_parameter_counts(name, kind, params):
    assert budget.shipped_config(name) is not None
    assert budget.model_shape(name, kind=kind).params == params


def test_small_config_parameter_count_by_hand(small_dir):
    shape = budget.model_shape(str(small_dir))
    embeddings = 1000 * 64  # embed_in, and embed_out again (untied)
    per_layer = (
        2 * (64 + 64)  # two LayerNorms, weight + bias
        + 64 * 192
        + 192  # query_key_value
        + 64 * 64
        + 64  # dense
        + 64 * 256
        + 256  # dense_h_to_4h
        + 256 * 64
        + 64  # dense_4h_to_h
    )
    assert per_layer == 49_984
    assert shape.params == 2 * embeddings + 2 * per_layer + (64 + 64) == 228_096
    assert (shape.hidden, shape.layers, shape.heads, shape.head_dim, shape.intermediate, shape.vocab) == (
        64,
        2,
        4,
        16,
        256,
        1000,
    )
    assert shape.fused_qkv and not shape.gated_mlp


# --- each component by hand -------------------------------------------------------------------------------------


def test_weights_8bit_by_hand(small_dir):
    shape = budget.model_shape(str(small_dir))
    int8_values = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64)  # 2 layers x 49,152
    scb = 2 * 4 * (192 + 64 + 256 + 64)  # one fp32 scale per output row
    biases = 2 * 2 * (192 + 64 + 256 + 64)  # fp16
    layer_norms = 2 * (2 * 2 * 128 + 128)  # fp16 as the model (our k-bit preparation), final norm included
    embeddings = 2 * 2 * 64_000  # embed_in + embed_out, fp16 (not peft's fp32 upcast)
    rotary = 2 * 2 * 4  # inv_freq and original_inv_freq: rotary_pct 0.25 of head_dim 16 -> 2 fp32 each
    assert budget.weight_bytes(shape, "8bit", 2) == int8_values + scb + biases + layer_norms + embeddings + rotary
    assert int8_values + scb + biases + layer_norms + embeddings + rotary == 362_512


def test_nf4_double_quant_by_hand():
    # 4096 values: 2048 bytes of 4-bit pairs, 64 blocks -> 64 uint8 absmax, 1 fp32 second-level absmax, fp32 offset
    assert budget.nf4_bytes(4096) == 2048 + 64 + 4 + 4
    # 1,000,000 values: 500,000 + 15,625 blocks + 62 fp32 (15,625 / 256 rounded up) + offset
    assert budget.nf4_bytes(1_000_000) == 500_000 + 15_625 + 4 * 62 + 4


def test_optimizer_states_by_type():
    assert budget.optimizer_bytes([10_000, 100], eight_bit=False) == 8 * 10_100
    # bitsandbytes: uint8 x 2 + fp32 absmax per 256-value block x 2; tensors under 4096 values stay 32-bit
    assert budget.optimizer_bytes([10_000, 100], eight_bit=True) == 2 * 10_000 + 8 * 40 + 8 * 100


def test_activations_by_hand(small_dir):
    shape = budget.model_shape(str(small_dir))
    s = budget.TrainSetup("8bit", 2, 8, ("query_key_value",), 0.05, "cuda")
    per_token = (
        2 * 64  # layer input
        + 16  # two LayerNorms' fp32 mean and rstd
        + 2 * (64 + 64)  # q and k after rotary
        + 2 * (64 + 2 * 64)  # the fused qkv output, kept alive by the v view (CUDA)
        + 2 * 64
        + 4 * 4  # attention output + fp32 logsumexp per head
        + 2 * 256  # GELU input
        + 2 * (3 * 64 + 256)  # int8 matmuls keep their inputs
        + 4 * 64
        + 64
        + 4 * 8  # LoRA: fp32 dropout output, bool mask, lora_A output
    )
    assert budget.layer_saved_per_token(shape, s, 32) == per_token == 2_688
    working = 2 * (2 * 64 + 2 * 256) + 4 * 64  # gradients in one layer + LoRA's fp32 input gradient
    dequant = 2 * 256 * 64  # the largest int8 weight dequantized to fp16 in backward
    tokens = 2 * 32
    stored = (2 + 1) * 2 * 64 * tokens  # each layer's input + the final norm's input
    with_gc = budget.train_activations(shape, s, 2, 32, checkpointing=True)
    assert with_gc == (stored, stored + (per_token - 2 * 64) * tokens + working * tokens + dequant)
    without = budget.train_activations(shape, s, 2, 32, checkpointing=False)
    assert without == (
        2 * per_token * tokens + 2 * 64 * tokens,
        2 * per_token * tokens + 2 * 64 * tokens + working * tokens + dequant,
    )
    assert without[1] > with_gc[1]


@pytest.mark.parametrize("reentrant", [True, False])
def test_sft_components_by_hand(small_dir, reentrant, monkeypatch):
    monkeypatch.setattr(moments, "checkpoint_reentrant", lambda: reentrant)
    est = budget.estimate(small_recipe(small_dir), "sft", 24 * GiB)
    lora = 2 * 8 * (64 + 192)  # r x (in + out) on query_key_value, 2 layers
    logits = 12 * 2 * 32 * 1000  # fp32 upcast + fp32 log-softmax + fp32 gradient, B x T x V
    at_loss = (2 + 1) * 2 * 64 * 64  # checkpointed layer inputs + final norm input, 64 tokens
    if not reentrant:  # bitsandbytes' int8 matmul inputs (ctx attributes) escape non-reentrant checkpointing
        at_loss += 2 * 2 * (3 * 64 + 256) * 64
    dynamic = 4 * lora + at_loss + logits  # gradients, activations, logits: allocated and freed every step
    expected = {
        "weights": 362_512,  # test_weights_8bit_by_hand
        "lora": 4 * lora,
        "gradients": 4 * lora,
        "optimizer": 8 * lora,
        "activations": at_loss,
        "logits": logits,
        "kv_cache": 0,
        "value_head": 0,
        "reward_model": 0,
        "overhead": CONTEXT + int(0.10 * dynamic),
    }
    assert est.peak == "loss (fp32 logits)"  # here the logits dwarf one layer's recompute
    assert est.components == expected
    assert est.total_bytes == sum(expected.values())


def test_ppo_components_by_hand(small_dir):
    est = budget.estimate(small_recipe(small_dir), "ppo", 24 * GiB, CPU_REWARD)
    c = est.moments["generation (KV cache)"]
    assert c["kv_cache"] == 2 * 2 * 4 * 16 * (4 + 8) * 64 * 2  # 2 x layers x heads x head_dim x (P + R) x batch x fp16
    assert c["lora"] == 4 * 2 * 8 * (64 + 192)
    assert c["value_head"] == 4 * (64 + 1)  # fp32 Linear(h, 1)
    assert c["optimizer"] == 8 * (2 * 8 * (64 + 192) + 64 + 1)  # Adam over the LoRA and the value head
    assert c["gradients"] == 0  # set to None after each update: none while generating
    assert c["reward_model"] == 0  # the spec puts it on the CPU
    sampling = 64 * 1000 * (2 + 12)  # last-position logits, fp32 copy, / temperature, softmax
    assert c["logits"] == sampling
    assert est.total_bytes == max(est.moment_totals.values()) == sum(est.components.values())


def test_grpo_components_by_hand(small_dir):
    """GRPO generates batch_size x group_size sequences, rollout_batch_size at a time (here all 64: the rollout setting
    of 128 is more than a step has), and holds no value head: PPO's moments less the head and what it reads."""
    grpo = budget.estimate(small_recipe(small_dir), "grpo", 24 * GiB, CPU_REWARD)
    ppo = budget.estimate(small_recipe(small_dir), "ppo", 24 * GiB, CPU_REWARD)
    c = grpo.moments["generation (KV cache)"]
    assert c["kv_cache"] == 2 * 2 * 4 * 16 * (4 + 8) * 64 * 2  # 64 sequences, as PPO's batch of 64
    assert c["optimizer"] == 8 * 2 * 8 * (64 + 192)  # Adam over the LoRA alone
    assert all(m["value_head"] == 0 for m in grpo.moments.values())
    head = ("value_head", "optimizer", "gradients", "overhead")  # what the value head adds to, in PPO
    for name, parts in grpo.moments.items():
        assert {k: v for k, v in parts.items() if k not in head} == {
            k: v for k, v in ppo.moments[name].items() if k not in head
        }, name
    update = "update (backward)"
    assert ppo.moments[update]["gradients"] - grpo.moments[update]["gradients"] == 4 * (64 + 1)
    assert grpo.total_bytes < ppo.total_bytes
    assert "8 prompts x 8 samples" in grpo.settings


def test_ppo_logit_chunks_by_hand(small_dir):
    """fp32 chunks of V-wide rows alive at once (seen with torch's memory profiler): entropy 4; the log-prob backward
    2, or 3 when the micro-batch is cut into several chunks. They grow with the vocabulary (128k-152k for Llama-3 and
    Qwen2), where a count too high overstates PPO by 10%."""
    recipe = small_recipe(small_dir)
    est = budget.estimate(recipe, "ppo", 24 * GiB, CPU_REWARD)
    V, kept = 1000, 8 + 1  # logits_to_keep = response + 1, in fp16
    scoring_chunk = 64 * 8  # the rollout's 64 x 8 response tokens fit one chunk of <= 512
    assert est.moments["scoring (policy + reference)"]["logits"] == 64 * kept * V * 2 + 4 * 4 * scoring_chunk * V
    one = est.moments["update (backward)"]["logits"]
    assert one == 2 * 1 * kept * V * 2 + 2 * 4 * 8 * V  # micro-batch 1: logits, their gradient, two fp32 chunks
    big = {"mini_batch_size": 64, "gradient_accumulation_steps": 1}  # 64 x 8 tokens: still one chunk
    many = {**big, "generation": GenerationConfig(min_new_tokens=16, max_new_tokens=16)}  # 64 x 16: two chunks
    for update, chunks, response in ((big, 2, 8), (many, 3, 16)):
        wide = recipe.model_copy(update={"ppo": recipe.ppo.model_copy(update=update)})
        logits = budget.estimate(wide, "ppo", 24 * GiB, CPU_REWARD).moments["update (backward)"]["logits"]
        assert logits == 2 * 64 * (response + 1) * V * 2 + chunks * 4 * 512 * V
    # An entropy bonus: its forward's four fp32 chunks, its own gradient of the logits beside the log-probs' until
    # autograd adds them, three fp32 chunks in its backward.
    bonus = recipe.model_copy(update={"ppo": recipe.ppo.model_copy(update={"entropy_coef": 0.01})})
    moments = budget.estimate(bonus, "ppo", 24 * GiB, CPU_REWARD).moments
    assert moments["update (loss)"]["logits"] == 1 * kept * V * 2 + 4 * 4 * 8 * V
    assert moments["update (backward)"]["logits"] == 3 * 1 * kept * V * 2 + 3 * 4 * 8 * V


def test_reward_model_on_the_gpu_counts_its_weights(small_dir):
    on_gpu = budget.estimate(small_recipe(small_dir), "ppo", 24 * GiB, {**CPU_REWARD, "device": "auto"})
    weights = 4 * 66_955_010  # fp32, as lvwerra/distilbert-imdb's checkpoint
    assert on_gpu.components["reward_model"] >= weights
    assert budget.load_reward_spec("no-such-reward")["model"] == "lvwerra/distilbert-imdb"  # assumed when missing


def test_reward_step_components_by_hand(small_dir):
    recipe = small_recipe(small_dir)
    reward_model = RewardModelConfig(
        batch_size=2, max_length=32, lora=LoraConfig(rank=8, dropout=0.0, target_modules=["query_key_value"])
    )
    recipe = recipe.model_copy(update={"reward_model": reward_model})
    est = budget.estimate(recipe, "reward", 24 * GiB)
    c = est.components
    trainable = 2 * 8 * (64 + 192) + 64 + 1  # LoRA on 2 layers' query_key_value (64 -> 192) + score head Linear(64, 1)
    assert c["lora"] == c["gradients"] == 4 * trainable
    assert c["optimizer"] == 8 * trainable  # AdamW: two fp32 states
    assert c["logits"] == 0  # the score head reads the last hidden state: no vocabulary-sized tensor
    setup = moments._lora_setup(recipe, budget.model_shape(str(small_dir)), "reward", "cuda")
    at_loss, at_backward = budget.train_activations(budget.model_shape(str(small_dir)), setup, 4, 32, True)
    assert est.moments["loss (pair scores)"]["activations"] == at_loss  # chosen + rejected: 2 x 2 sequences
    assert est.moments["backward (one layer)"]["activations"] == at_backward
    assert est.total_bytes == max(est.moment_totals.values())


def test_ppo_with_a_reward_adapter_counts_the_adapter_not_a_model(small_dir):
    recipe = small_recipe(small_dir)
    adapter = {"adapter": {"rank": 8, "targets": ["query_key_value"]}}
    est = budget.estimate(recipe, "ppo", 24 * GiB, adapter)
    resident = 4 * (2 * 8 * (64 + 192) + 64 + 1)  # the reward LoRA and score head, fp32; no second set of weights
    assert est.moments["generation (KV cache)"]["reward_model"] == resident
    assert est.moments["reward"]["reward_model"] > resident  # + a no-grad forward of a rollout batch
    with_classifier = budget.estimate(recipe, "ppo", 24 * GiB, {**CPU_REWARD, "device": "auto"})
    assert est.moments["reward"]["reward_model"] < with_classifier.moments["reward"]["reward_model"]
    planned = recipe.model_copy(update={"reward": recipe.reward.model_copy(update={"name": "runs/x/reward"})})
    reward_lora = recipe.reward_model.lora.model_copy(update={"rank": 8, "target_modules": ["query_key_value"]})
    planned = planned.model_copy(update={"reward_model": recipe.reward_model.model_copy(update={"lora": reward_lora})})
    assert budget.estimate(planned, "ppo", 24 * GiB).components == est.components  # planned from reward_model.lora


# --- totals, verdict, JSON --------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["sft", "reward", "ppo", "grpo", "dpo", "merge"])
def test_total_is_the_sum_of_components(small_dir, step):
    est = budget.estimate(small_recipe(small_dir), step, 24 * GiB, CPU_REWARD)
    data = est.to_json()
    assert data["total_bytes"] == sum(data["components"].values())


@pytest.mark.parametrize("step", ["sft", "reward", "ppo", "grpo", "dpo"])
def test_verdict_flips_at_the_boundary(small_dir, step):
    total = budget.estimate(small_recipe(small_dir), step, 24 * GiB, CPU_REWARD).total_bytes
    assert budget.estimate(small_recipe(small_dir), step, total, CPU_REWARD).fits
    assert not budget.estimate(small_recipe(small_dir), step, total - 1, CPU_REWARD).fits


def test_json_shape_matches_the_contract(small_dir, capsys):
    data = budget.estimate(small_recipe(small_dir), "ppo", 24 * GiB, CPU_REWARD).to_json()
    assert list(data) == ["model", "step", "params", "device_bytes", "total_bytes", "fits", "components"]
    assert (
        list(data["components"])
        == list(budget.COMPONENTS)
        == [
            "weights",
            "lora",
            "gradients",
            "optimizer",
            "activations",
            "logits",
            "kv_cache",
            "value_head",
            "reward_model",
            "overhead",
        ]
    )
    assert isinstance(data["fits"], bool) and all(isinstance(v, int) for v in data["components"].values())
    recipe = small_recipe(small_dir).model_copy(update={"budget": BudgetConfig(gpu="24GiB")})
    assert budget.main(recipe, "all", None, as_json=True) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [d["step"] for d in printed] == ["sft", "merge", "reward", "ppo", "grpo", "dpo"]
    assert budget.main(recipe, "sft", "12GiB", as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["device_bytes"] == 12 * GiB


# --- devices ----------------------------------------------------------------------------------------------------


def test_gpu_names_and_sizes():
    assert budget.gpu_bytes("24GiB") == 24 * GiB
    assert budget.gpu_bytes("512MiB") == 512 * MiB
    assert budget.gpu_bytes("24GB") == 24 * 10**9
    assert budget.gpu_bytes("1.5GiB") == int(1.5 * GiB)
    assert budget.gpu_bytes("RTX4090") == budget.GPUS["rtx4090"]
    with pytest.raises(UserError, match="rtx4090.*a100-80.*24GiB"):
        budget.gpu_bytes("big")
    with pytest.raises(UserError, match="'24'"):  # a forgotten unit, not a card of 24 bytes
        budget.gpu_bytes("24")


def test_device_precedence(neox20b, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert budget.resolve_device("12GiB", neox20b).bytes == 12 * GiB  # the flag wins
    device = budget.resolve_device(None, neox20b)
    assert device.bytes == 24 * GiB and "budget.gpu" in device.description  # then the recipe's budget.gpu
    plain = neox20b.model_copy(update={"budget": BudgetConfig(gpu=None)})
    device = budget.resolve_device(None, plain)
    assert "RAM" in device.description and device.bytes > 0  # then this machine: free RAM on a CPU run


# --- gpt-neox-20b: the done-when checks --------------------------------------------------------------------------


def check_fits_24gib(recipe: Recipe, step: str) -> None:
    data = budget.estimate(recipe, step, budget.gpu_bytes("24GiB")).to_json()
    assert data["params"] == NEOX_20B
    assert set(data["components"]) == set(budget.COMPONENTS)
    assert data["total_bytes"] == sum(data["components"].values())
    assert 18.5 * GiB <= data["components"]["weights"] <= 23.5 * GiB
    assert data["components"]["activations"] > 0 and data["components"]["overhead"] >= CONTEXT
    assert data["fits"] and data["total_bytes"] <= 24 * GiB


@pytest.mark.parametrize("step", ["sft", "reward", "ppo", "grpo", "dpo"])
def test_gpt_neox_20b_fits_24gib(neox20b, step):
    # rlhf checkpoints reentrantly (modeling.CHECKPOINT_KWARGS), which frees bitsandbytes' int8 matmul inputs.
    assert budget.checkpoint_reentrant()
    check_fits_24gib(neox20b, step)


def test_gpt_neox_20b_ppo_with_a_learned_reward_fits_24gib(neox20b):
    with_adapter = neox20b.model_copy(update={"reward": neox20b.reward.model_copy(update={"name": "runs/x/reward"})})
    est = budget.estimate(with_adapter, "ppo", 24 * GiB)
    assert est.fits
    # One base: the reward costs its LoRA (66 MiB at r=16 on query_key_value) and activations, not 20 GB of weights.
    assert est.components["weights"] == budget.estimate(neox20b, "ppo", 24 * GiB).components["weights"]
    assert est.moments["generation (KV cache)"]["reward_model"] < 100 * MiB


def test_nonreentrant_checkpointing_keeps_the_int8_inputs(neox20b, monkeypatch):
    monkeypatch.setattr(moments, "checkpoint_reentrant", lambda: True)
    freed = budget.estimate(neox20b, "sft", 24 * GiB)
    monkeypatch.setattr(moments, "checkpoint_reentrant", lambda: False)
    kept = budget.estimate(neox20b, "sft", 24 * GiB)
    int8_inputs = 44 * 2 * (3 * 6144 + 24576) * 1024  # layers x fp16 x (ln1, context, ln2, GELU out) x tokens
    assert kept.components["activations"] - freed.components["activations"] == int8_inputs
    assert any("non-reentrant" in note for note in kept.notes)
    assert budget.estimate(
        neox20b.model_copy(update={"sft": neox20b.sft.model_copy(update={"block_size": 512})}), "sft", 24 * GiB
    ).fits  # the recipe-only way out


def test_budget_follows_modelings_checkpointing(monkeypatch):
    import inspect

    from rlhf import checkpointing, modeling

    source = inspect.getsource(modeling.prepare_for_training)
    assert "kwargs=CHECKPOINT_KWARGS" in source and modeling.CHECKPOINT_KWARGS is checkpointing.CHECKPOINT_KWARGS
    assert budget.checkpoint_reentrant()
    monkeypatch.setattr(checkpointing, "CHECKPOINT_KWARGS", {"use_reentrant": False})
    assert not budget.checkpoint_reentrant()


def test_gpt_neox_20b_ppo_at_12gib_ranks_reestimated_suggestions(neox20b):
    est = budget.estimate(neox20b, "ppo", 12 * GiB)
    assert not est.fits
    ranked = budget.suggest(est)
    assert ranked and ranked[0].fits
    fitting = [s for s in ranked if s.fits]
    assert ranked[: len(fitting)] == fitting  # what fits comes first ...
    assert [(s.cost, s.total_bytes) for s in fitting] == sorted((s.cost, s.total_bytes) for s in fitting)
    rest = ranked[len(fitting) :]
    assert [s.total_bytes for s in rest] == sorted(s.total_bytes for s in rest)  # ... then by what they save
    for s in ranked:  # each one re-estimated: applying it gives exactly the total shown
        recipe, spec = budget.apply_changes(neox20b, est.reward_spec, s.changes)
        again = budget.estimate(recipe, "ppo", 12 * GiB, spec)
        assert (again.total_bytes, again.fits) == (s.total_bytes, s.fits)
        assert again.total_bytes < est.total_bytes
    table = budget.render_table(est)
    assert "does NOT fit" in table and ranked[0].text in table


def test_gpt_neox_20b_grpo_at_12gib_suggests_its_own_keys(neox20b):
    est = budget.estimate(neox20b, "grpo", 12 * GiB)
    ranked = budget.suggest(est)
    assert not est.fits and ranked and ranked[0].fits
    keys = {c.key for s in ranked for c in s.changes}
    assert "grpo.rollout_batch_size" in keys and not any(k.startswith("ppo.") for k in keys)
    recipe, spec = budget.apply_changes(neox20b, est.reward_spec, ranked[0].changes)
    assert budget.estimate(recipe, "grpo", 12 * GiB, spec).fits
    with pytest.raises(DoesNotFit):
        budget.preflight(neox20b, "grpo", "12GiB", force=False, out=io.StringIO())


def test_gpt_neox_20b_dpo_at_16gib_suggests_its_own_keys(neox20b):
    est = budget.estimate(neox20b, "dpo", 16 * GiB)
    ranked = budget.suggest(est)
    assert not est.fits and ranked and ranked[0].fits
    keys = {c.key for s in ranked for c in s.changes}
    assert {"dpo.batch_size", "dpo.max_length", "model.quantization"} <= keys
    assert not any(k.startswith(("ppo.", "reward_model.")) for k in keys)
    recipe, spec = budget.apply_changes(neox20b, est.reward_spec, ranked[0].changes)
    assert budget.estimate(recipe, "dpo", 16 * GiB, spec).fits
    # the reference's forward (no graph) never outweighs the policy's backward; the logits of both sides count
    assert est.peak == "backward (one layer)" and est.components["logits"] > 0
    with pytest.raises(DoesNotFit):
        budget.preflight(neox20b, "dpo", "16GiB", force=False, out=io.StringIO())


def test_gpt_neox_20b_merge_is_ram_and_disk(neox20b):
    est = budget.estimate(neox20b, "merge", 64 * GiB, disk_path=".")
    assert est.disk_bytes == 2 * NEOX_20B  # fp16 shards
    assert est.components["weights"] == 12 * 6144 * 18432  # fp16 qkv + two fp32 scratch + fp16 out
    assert est.fits == (est.disk_free >= est.disk_bytes)


# --- pre-flight and auto-fit ------------------------------------------------------------------------------------


def test_preflight_refuses_or_warns(neox20b):
    out = io.StringIO()
    with pytest.raises(DoesNotFit) as info:
        budget.preflight(neox20b, "ppo", "12GiB", force=False, out=out)
    assert "does NOT fit" in info.value.report and "--force" in str(info.value)
    out = io.StringIO()
    est = budget.preflight(neox20b, "ppo", "12GiB", force=True, out=out)
    assert not est.fits and "warning" in out.getvalue()
    assert budget.preflight(neox20b, "ppo", "24GiB", force=False, out=io.StringIO()).fits


def test_auto_fit_keeps_the_effective_batch(small_dir, monkeypatch):
    recipe = small_recipe(small_dir, batch_size=2, gradient_accumulation_steps=4)
    big = budget.estimate(
        recipe.model_copy(
            update={"sft": recipe.sft.model_copy(update={"batch_size": 8, "gradient_accumulation_steps": 1})}
        ),
        "sft",
        1 << 40,
    ).total_bytes
    fitted = budget.auto_fit(recipe, "sft", f"{big}B")
    assert (fitted.sft.batch_size, fitted.sft.gradient_accumulation_steps) == (8, 1)  # the largest that fits
    small = budget.estimate(
        recipe.model_copy(
            update={"sft": recipe.sft.model_copy(update={"batch_size": 4, "gradient_accumulation_steps": 2})}
        ),
        "sft",
        1 << 40,
    ).total_bytes
    fitted = budget.auto_fit(recipe, "sft", f"{small}B")
    assert (fitted.sft.batch_size, fitted.sft.gradient_accumulation_steps) == (4, 2)

    monkeypatch.setattr(peak, "load_reward_spec", lambda name: CPU_REWARD)
    fitted = budget.auto_fit(recipe, "ppo", "1TiB")
    assert fitted.ppo.mini_batch_size == recipe.ppo.mini_batch_size
    assert fitted.ppo.gradient_accumulation_steps == 1  # micro-batch = the whole mini-batch when it fits
    fitted = budget.auto_fit(recipe, "grpo", "1TiB")
    assert fitted.grpo.mini_batch_size == recipe.grpo.mini_batch_size and fitted.grpo.gradient_accumulation_steps == 1
    assert fitted.grpo.rollout_batch_size == 64  # every sequence of a step (8 prompts x 8 samples) at once
    dpo = recipe.model_copy(
        update={"dpo": recipe.dpo.model_copy(update={"batch_size": 2, "gradient_accumulation_steps": 4})}
    )
    fitted = budget.auto_fit(dpo, "dpo", "1TiB")
    assert (fitted.dpo.batch_size, fitted.dpo.gradient_accumulation_steps) == (8, 1)  # the same 8 pairs a step


def test_budget_list_names_the_shipped_models(capsys):
    from conftest import cli

    assert cli("budget", "--list") == 0
    out = capsys.readouterr().out
    for model in ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-3B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-14B",
                  "mistralai/Mistral-7B-v0.3", "google/gemma-2-9b", "microsoft/phi-4", "EleutherAI/pythia-12b",
                  "EleutherAI/gpt-neox-20b"):  # fmt: skip
        assert model in out, model
    assert "20.55 B parameters" in out and "lvwerra/distilbert-imdb" not in out  # causal LMs only


def test_budget_list_with_a_card_says_which_shipped_models_fit_and_how(capsys):
    """`rlhf budget --list --gpu 24GiB --step grpo`: every shipped model with its verdict, largest first; the largest
    that fits is the 32B recipe on its NF4 base; gemma-2-27b fits only once 4-bit, which the line says."""
    from conftest import cli

    assert cli("budget", "--list", "--gpu", "24GiB", "--step", "grpo") == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "fits as it is" in lines["`qwen2.5-32b`"]
    assert "fits with model.quantization=4bit" in lines["google/gemma-2-27b"]
    assert out.index("qwen2.5-32b") < out.index("gemma-2-27b") < out.index("pythia-160m")  # largest first
    assert out.strip().endswith("largest that fits: `qwen2.5-32b` recipe")

    assert cli("budget", "--list", "--gpu", "16GiB", "--step", "ppo", "--json") == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["Qwen/Qwen2.5-32B"]["settings"] is None and not rows["Qwen/Qwen2.5-32B"]["fits"]
    best = [r for r in rows.values() if r["largest"]]
    assert len(best) == 1 and best[0]["model"] == "EleutherAI/gpt-neox-20b" and "4bit" in best[0]["settings"]
    # the settings it names do fit: the same estimate with them applied
    recipe = load_recipe("gpt-neox-20b", ["model.quantization=4bit"])
    assert budget.estimate(recipe, "ppo", budget.gpu_bytes("16GiB")).fits


def test_budget_list_on_a_card_refuses_merge(capsys):
    from conftest import cli

    assert cli("budget", "--list", "--gpu", "24GiB", "--step", "merge") == 2
    assert "merge runs in RAM" in capsys.readouterr().err
