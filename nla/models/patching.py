"""The target model's next-token distribution with the residual stream after block K replaced at
the last position: the model operation behind eval's functional reinjection
(`nla/stages/reinjection.py`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nla.models.av import cache_keyword, position_ids
from nla.models.backbone import decoder_layers, last_token_index


def next_token_logprobs(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layer: int, patches: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """-> (log-probs [b, vocab] of the token after each row's last real token, block-`layer` output
    there [b, d], the log-probs with each of `patches` [b, d] replacing that output).

    Everything before the last token is the same in every run (attention is causal), so it runs
    once; its KV cache then serves the last token as is and once per patch. Rows are left-aligned
    (their last tokens share the final column), positions counted over real tokens."""
    ids, mask = _left_aligned(ids, mask)
    positions = position_ids(mask)
    prefix: dict[str, Any] = {}
    if ids.shape[1] > 1:
        out = model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            logits_to_keep=1,
        )
        prefix = {cache_keyword(model): getattr(out, "cache", None) or out.past_key_values}
    seen: dict[str, torch.Tensor] = {}

    def last_token(patch: torch.Tensor | None) -> torch.Tensor:
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            seen.setdefault("h", hidden[:, -1].detach().float())
            if patch is None:
                return output
            hidden = hidden.clone()
            hidden[:, -1] = patch.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden

        handle = decoder_layers(model)[layer].register_forward_hook(hook)
        try:
            cache = {k: copy.deepcopy(v) for k, v in prefix.items()}  # each run appends its token to the cache
            logits = model(
                input_ids=ids[:, -1:],
                attention_mask=mask,
                position_ids=positions[:, -1:],
                use_cache=bool(cache),
                **cache,
            ).logits
        finally:
            handle.remove()
        return F.log_softmax(logits[:, -1].float(), dim=-1)

    original = last_token(None)
    return original, seen["h"], [last_token(p) for p in patches]


def _left_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (padding first)."""
    shift = (mask.shape[1] - 1 - last_token_index(mask)).tolist()
    if not any(shift):
        return ids, mask
    return (torch.stack([r.roll(s) for r, s in zip(ids, shift)]), torch.stack([r.roll(s) for r, s in zip(mask, shift)]))
