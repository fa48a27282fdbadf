"""One quantized model, three roles: the policy (LoRA on), the reference (LoRA off) and the value trunk.

Holding a second frozen copy as the reference would double the weights (20 GB more for gpt-neox-20b in 8-bit);
the reference *is* the merged model, so the same weights with the adapter disabled give its log-probs exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf.ppo.core import entropy_from_logits, logprobs_from_logits


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


@dataclass
class Scored:
    logprobs: Tensor  # [B, R] log-prob of each response token
    values: Tensor | None  # [B, R] value of the state before each response token
    entropy: Tensor | None  # [B, R]


class PolicyWithValue:
    """The PEFT policy and its value head, with the forward passes PPO needs."""

    def __init__(self, model, value_head: ValueHead, temperature: float = 1.0):
        self.model = model
        self.value_head = value_head
        self.temperature = temperature
        self._hidden: Tensor | None = None
        # The input of the output embedding is the last hidden state at exactly the positions whose logits are
        # computed (logits_to_keep), which is what the value head needs: no full hidden-states tuple is kept.
        model.get_output_embeddings().register_forward_pre_hook(self._keep_hidden)

    def _keep_hidden(self, module, args):
        self._hidden = args[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    @contextmanager
    def reference(self):
        # The reference policy is the merged model itself: the same weights with the PPO adapter switched off.
        with self.model.disable_adapter():
            yield

    def score(
        self, input_ids: Tensor, attention_mask: Tensor, n_response: int, values: bool = True, entropy: bool = False
    ) -> Scored:
        """Log-probs (and values) of the last `n_response` tokens of prompt+response sequences.

        Only the logits of those positions are computed (`logits_to_keep`), never batch x sequence x vocab.
        """
        out = self.model(
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
        ent = None
        if entropy:
            with torch.no_grad():
                ent = entropy_from_logits(logits)
        vals = self.value_head(self._hidden[:, :-1]) if values else None
        self._hidden = None
        return Scored(logprobs, vals, ent)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        max_new_tokens: int,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample `max_new_tokens` tokens after left-padded prompts, with a KV cache.

        Returns (response_ids [B, N], response_mask [B, N]); with `eos_token_id`, tokens after a row's first EOS are
        masked out (the row keeps its EOS). Our own loop rather than generate(): positions, sampling and stopping
        are exactly those the scoring forward assumes.
        """
        model = self.model
        ids, mask = prompt_ids, prompt_mask
        positions = position_ids_for(mask)
        past = None
        step_ids, step_pos = ids, positions
        out_tokens = []
        alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        response_mask = []
        for _ in range(max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
            logits = out.logits[:, -1].float() / self.temperature
            token = sample(logits, top_k, top_p)
            out_tokens.append(token)
            response_mask.append(alive.clone())
            if eos_token_id is not None:
                alive &= token != eos_token_id
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids = token[:, None]
            step_pos = positions[:, -1:] + len(out_tokens)
        return torch.stack(out_tokens, 1), torch.stack(response_mask, 1).long()


def sample(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Draw one token per row; top_k=0 and top_p=1 sample from the full distribution (the PPO default)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1).squeeze(-1)
