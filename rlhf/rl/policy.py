"""One quantized model, several roles: the policy (its LoRA on), the reference (LoRA off) and, for PPO, the value trunk.

Holding a second frozen copy as the reference would double the weights (20 GB more for gpt-neox-20b in 8-bit);
the reference *is* the merged model, so the same weights with the adapter disabled give its log-probs exactly.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf.rl.core import entropy_from_logits, logprobs_from_logits
from rlhf.rl.prompts import pad_right


class ValueHead(nn.Module):
    """A linear map from the last hidden state to a scalar value, in fp32 (fp16 heads go NaN after a few updates)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def position_ids_for(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so a left-padded prompt sees the same positions as an unpadded one.

    generate() and the scoring forward must agree on this, or the policy's and the reference's log-probs are taken
    at different rotary positions and the KL goes negative.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def trim_padding(input_ids: Tensor, attention_mask: Tensor, n_response: int) -> tuple[Tensor, Tensor, int]:
    """Drop the columns that are padding in every row: leading prompt columns (prompts are left-padded) and trailing
    response columns (responses are right-padded). Returns (ids, mask, response columns kept, at least one).

    Exact: a masked column is attended by no position, and positions count real tokens only (`position_ids_for`).
    Under LLM.int8 the outlier columns are picked per batch, so the cut changes the numbers, but the rollout's
    scoring and the update cut the same micro-batch the same way, and the first ratio stays exactly 1.
    """
    real = attention_mask.bool().any(0).tolist()  # one sync for the whole decision
    n_prompt = len(real) - n_response
    # At least one prompt column stays: the first response token's log-prob is read at the position before it.
    start = next((i for i in range(n_prompt) if real[i]), max(n_prompt - 1, 0))
    keep = max((i + 1 for i in range(n_response) if real[n_prompt + i]), default=1)
    end = n_prompt + keep
    if start == 0 and end == len(real):
        return input_ids, attention_mask, n_response
    return input_ids[:, start:end], attention_mask[:, start:end], keep


def disable_dropout(model: nn.Module) -> int:
    """Switch every dropout of the model off; returns how many were on.

    RL scores old log-probs, values and the reference in train mode (the mode the update runs in: LLM.int8 and
    checkpointing differ between modes), so any dropout would turn them into random samples. trl's
    `disable_dropout_in_model` only zeroes `nn.Dropout` modules; attention dropout is also a float read by the
    attention function (`self.attention_dropout`, `config.attention_dropout`), so those are zeroed here too.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            switched += 1
        for name in ("attention_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                switched += 1
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
                setattr(config, key, 0.0)
                switched += 1
    return switched


@dataclass
class Scored:
    logprobs: Tensor  # [B, R] log-prob of each response token
    values: Tensor | None  # [B, R] value of the state before each response token
    entropy: Tensor | None  # [B, R]


class Policy(nn.Module):
    """The PEFT policy and (for PPO) its value head, with the forward passes RL needs.

    An `nn.Module` so that data parallelism can wrap adapter and value head together in one DDP module; `forward` is
    `score`, the only pass that takes gradients.
    """

    def __init__(self, model, value_head: ValueHead | None = None, temperature: float = 1.0, compile: bool = False):
        super().__init__()
        self.model = model
        # The passes with a fixed structure (scoring, the update) are compiled; generation's growing KV cache is not.
        # dynamic: every micro-batch has its own width. Kept out of the submodules: registered, the compiled wrapper
        # would list the model's parameters a second time (state_dict, DDP).
        self.__dict__["_scoring_model"] = torch.compile(model, dynamic=True) if compile else model
        self.value_head = value_head
        self.temperature = temperature
        self._hidden: Tensor | None = None
        # transformers 5.2x renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel, or a plain one
        forward_params = inspect.signature(base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        if value_head is not None:
            # The input of the output embedding is the last hidden state at exactly the positions whose logits are
            # computed (logits_to_keep), which is what the value head needs: no full hidden-states tuple is kept.
            model.get_output_embeddings().register_forward_pre_hook(self._keep_hidden)

    def _keep_hidden(self, module, args):
        self._hidden = args[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @contextmanager
    def reference(self):
        # The reference policy is the merged model itself: the same weights with the policy adapter switched off.
        with self.model.disable_adapter():
            yield

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, n_response: int, values: bool = True, entropy: bool = False
    ) -> Scored:
        """Log-probs (and values) of the last `n_response` tokens of prompt+response sequences.

        Only the logits of those positions are computed (`logits_to_keep`), never batch x sequence x vocab. Columns
        that are padding in every row (a micro-batch's shared left padding, response tails masked in all its rows) are
        cut before the forward and come back as zeros: no position attends to them, so the rest is unchanged.
        """
        width = n_response
        input_ids, attention_mask, n_response = trim_padding(input_ids, attention_mask, n_response)
        out = self._scoring_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            logits_to_keep=n_response + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        response = input_ids[:, -n_response:]
        logprobs = logprobs_from_logits(logits, response)
        # Differentiable where grad is on (an entropy bonus); rollout scoring runs under no_grad.
        ent = entropy_from_logits(logits) if entropy else None
        vals = self.value_head(self._hidden[:, :-1]) if values and self.value_head is not None else None
        self._hidden = None
        if n_response < width:
            logprobs, vals, ent = (None if t is None else pad_right(t, width, 0) for t in (logprobs, vals, ent))
        return Scored(logprobs, vals, ent)

    score = forward

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        greedy: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample `max_new_tokens` tokens after left-padded prompts, with a KV cache.

        Returns (response_ids [B, N], response_mask [B, N], logprobs [B, N]: each sampled token's log-prob under the
        distribution it was drawn from); `greedy` takes the most likely token instead (evaluation). With
        `eos_token_id`, tokens after a row's first EOS are masked out (the row keeps its EOS), and decoding stops once
        every row has ended (N < max_new_tokens then). Our own loop rather than generate(): positions, sampling and
        stopping are exactly those the scoring forward assumes.
        """
        from transformers import DynamicCache

        ids, prompt_width = prompt_ids, prompt_ids.shape[1]
        positions = position_ids_for(prompt_mask)
        # The mask of every step at once, sliced per step, rather than a concatenation per token.
        full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(ids.shape[0], max_new_tokens)], 1)
        cache = DynamicCache(config=self.model.config)
        step_ids, step_pos = ids, positions
        out_tokens, out_logprobs, response_mask = [], [], []
        alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        for i in range(max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=full_mask[:, : prompt_width + i],
                position_ids=step_pos,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: cache},
            )
            logits = out.logits[:, -1].float()
            if self.temperature != 1.0:
                logits = logits / self.temperature
            token = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
            logprobs = torch.log_softmax(logits, dim=-1)
            out_tokens.append(token)
            out_logprobs.append(logprobs.gather(-1, token[:, None]).squeeze(-1))
            response_mask.append(alive.clone())
            if eos_token_id is not None:
                alive &= token != eos_token_id
                if not alive.any():  # every row has ended: what would follow is masked out anyway
                    break
            step_ids = token[:, None]
            step_pos = positions[:, -1:] + len(out_tokens)
        return torch.stack(out_tokens, 1), torch.stack(response_mask, 1).long(), torch.stack(out_logprobs, 1)
