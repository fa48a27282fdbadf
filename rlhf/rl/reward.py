"""The reward model on the merged model's weights: a LoRA adapter + an fp32 score head on the last real token.

Scores come from the decoder body's last hidden state (`base_model`, no LM head): a [B, T, V] logits tensor is
never made, and the policy's value-head hook on the output embedding never fires for a reward pass.

In PPO the reward adapter is loaded into the policy's own PEFT model (`SharedBaseReward`): one base in memory serves
the policy (its adapter on), the reference (adapters off), the value trunk and the reward (the reward adapter on).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from rlhf.errors import UserError
from rlhf.rl.policy import position_ids_for
from rlhf.rl.reward_files import INFO, SCORE_HEAD

REWARD_ADAPTER = "reward"  # the adapter's name inside the policy's PEFT model
FINGERPRINT_BYTES = 4096


class ScoreHead(nn.Module):
    """Linear(hidden, 1) in fp32 on the last real token's hidden state (fp16 heads go NaN, as the value head does)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.score.weight, std=(hidden_size + 1) ** -0.5)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.score(hidden.float()).squeeze(-1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token, whatever the padding (left, right, or both: a PPO prompt + response)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def sequence_scores(model, head: ScoreHead, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B] scores: the head on the last real token's final hidden state, positions counted over real tokens (as the
    policy counts them, so left padding changes nothing). Texts end with EOS (as trl's reward trainer ends them): the
    score is read at the same token whatever the text, not at whichever word it stopped on."""
    body = model.get_base_model().base_model  # the decoder without its LM head
    hidden = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
    ).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last_token_index(attention_mask)])


def base_fingerprint(model_dir: Path) -> str:
    """A digest of a model directory's weights that survives copying or moving the run: config.json and, for every
    tensor, its name, dtype, shape and first FINGERPRINT_BYTES bytes. Two merges of different adapters differ in
    every adapted matrix, so they differ here; reading a few KiB per tensor costs a second even for gpt-neox-20b."""
    from rlhf.tensorfiles import checkpoint_entries

    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for entry in checkpoint_entries(model_dir):
        digest.update(f"{entry.name}|{entry.dtype}|{entry.shape}".encode())
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            digest.update(f.read(min(entry.nbytes, FINGERPRINT_BYTES)))
    return digest.hexdigest()


def read_info(adapter_dir: Path) -> dict:
    path = adapter_dir / INFO
    if not path.is_file():
        raise UserError(f"{adapter_dir} has no {INFO}: not a reward model written by `rlhf reward`; train one there")
    return json.loads(path.read_text())


def check_same_base(adapter_dir: Path, merged: Path) -> None:
    """A reward adapter scores on the policy's own weights only if it was trained on exactly those weights."""
    info = read_info(adapter_dir)
    if info.get("base_fingerprint") != base_fingerprint(merged):
        raise UserError(
            f"the reward model {adapter_dir.parent} was trained on another base ({info.get('base')}), not this run's "
            f"merged model {merged}; train one on this run with `rlhf reward --run {merged.parent}`, or use that "
            f"run for PPO"
        )


def load_score_head(adapter_dir: Path, device: torch.device) -> ScoreHead:
    weights = load_file(str(adapter_dir / SCORE_HEAD))
    head = ScoreHead(weights["score.weight"].shape[1])
    head.load_state_dict(weights)
    return head.to(device)


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


class SharedBaseReward:
    """The learned reward scored on the policy's loaded weights: the reward adapter switched on, the policy adapter
    off, under no_grad; the policy adapter is active again (with its trainability as before) when scoring ends.

    `score_tokens` scores the policy's own token ids (same base, same tokenizer: nothing is re-tokenized);
    `__call__` takes texts, for callers that hold only text. `positive` is score > 0: `rlhf reward` centres the head
    so that held-out answers score 0 on average (a judge may replace it: `reward.judge`).
    """

    def __init__(self, model, adapter_dir: Path, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        device = next(p for p in model.parameters()).device
        # Never trainable: loaded frozen, and every switch below restores requires_grad exactly. peft's load_adapter
        # also puts the whole model in eval mode; the policy's passes depend on the mode (LLM.int8, checkpointing),
        # so each module's mode is put back.
        modes = _modes(model)
        model.load_adapter(str(adapter_dir), adapter_name=REWARD_ADAPTER, is_trainable=False)
        _restore(modes)
        self.head = load_score_head(adapter_dir, device).requires_grad_(False)

    @contextmanager
    def active(self):
        """The reward adapter on (frozen) and the model in eval mode; on exit the previous adapter, requires_grad
        flags and modes exactly as they were. peft's set_adapter also makes the active adapter trainable and the
        others frozen, hence the flags are saved and put back."""
        model = self.model
        previous, modes = model.active_adapter, _modes(model)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.set_adapter(REWARD_ADAPTER, inference_mode=True)
        model.eval()
        try:
            yield
        finally:
            model.set_adapter(previous)
            for param, flag in flags:
                param.requires_grad_(flag)
            _restore(modes)

    @torch.no_grad()
    def score_tokens(self, texts: list[str], input_ids: Tensor, attention_mask: Tensor):
        from rlhf.rewards import Scores

        # The score is read at an EOS after the text, as in training. Appended as a last column: pads between the
        # text and it are masked and positions count real tokens only, so it sits right after each row's text. A
        # response that stopped at its own EOS has it already: a second one would be read at a place training never
        # scored, so that row's column stays masked.
        eos_id = self.tokenizer.eos_token_id
        rows = torch.arange(len(input_ids), device=input_ids.device)
        ended = input_ids[rows, last_token_index(attention_mask)] == eos_id
        input_ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], eos_id)], 1)
        attention_mask = torch.cat([attention_mask, (~ended).to(attention_mask.dtype)[:, None]], 1)
        scores = []
        with self.active():
            for start in range(0, len(input_ids), self.batch_size):
                end = start + self.batch_size
                scores.append(sequence_scores(self.model, self.head, input_ids[start:end], attention_mask[start:end]))
        scores = torch.cat(scores).float().cpu()
        return Scores(scores, scores > 0)

    def __call__(self, texts: list[str]):
        device = next(p for p in self.model.parameters()).device
        batch = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        return self.score_tokens(texts, batch["input_ids"], batch["attention_mask"])
