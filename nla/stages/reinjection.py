"""Functional reinjection: does the AR's reconstruction *behave* like the activation?

For a row (a context ending at the explained position), the target model reads the same tokens
as is and with the residual stream after block K at the last position replaced by a patch (the
tokens before the last run once: their KV cache serves every variant). The next-token
distributions are compared: KL(original ‖ patched) and whether the top token agrees. Patches: the
AR's reconstruction rescaled to the original vector's norm, and three baselines patched at the same
place: the mean activation of the rows (same norm), another row's activation (same norm), and zero.
`recovered` = 1 − KL_reconstruction / KL_mean: 1 when the reconstruction behaves like the
activation, 0 when it does no better than the mean direction.

Contexts are re-tokenized from their text; a row is used only when that gives back its position
and the stored activation (relative error < 1e-2), so a tokenization round trip that drifts is
left out and counted, never patched at the wrong place.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nla.data.splits import derangement
from nla.models.ar import pad_batch
from nla.models.av import cache_keyword, position_ids
from nla.models.backbone import decoder_layers, last_token_index

MATCH_TOLERANCE = 1e-2  # relative error between the re-extracted and the stored activation


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


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probs [b, vocab]."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1).clamp_min(0.0)


def _rescaled(directions: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return directions * (norms / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def reinjection_scores(
    model: nn.Module,
    tokenizer,
    contexts: list[str],
    positions: list[int | None],
    vectors: torch.Tensor,
    reconstructions: torch.Tensor,
    layer: int,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """The report's `reinjection` section and one KL per row (None where the row was left out).

    `vectors` [n, d] raw activations; `reconstructions` [n, d] the AR's predictions (any scale)."""
    device = next(model.parameters()).device
    n = len(contexts)
    token_ids = [tokenizer(c, add_special_tokens=True)["input_ids"] if c else [] for c in contexts]
    usable = [
        i for i in range(n) if token_ids[i] and (positions[i] is None or len(token_ids[i]) - 1 == int(positions[i]))
    ]
    vectors = vectors.float()
    mean = vectors.mean(dim=0)
    other = derangement(n, seed) if n > 1 else torch.zeros(1, dtype=torch.long)
    per_row: list[float | None] = [None] * n
    kls: dict[str, list[torch.Tensor]] = {k: [] for k in ("reconstruction", "mean", "shuffled", "zero")}
    agree: dict[str, list[torch.Tensor]] = {k: [] for k in kls}
    mismatched = 0
    for start in range(0, len(usable), batch_size):
        batch = usable[start : start + batch_size]
        ids, mask = pad_batch([token_ids[i] for i in batch], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        v = vectors[batch].to(device)
        norms = v.norm(dim=-1, keepdim=True)
        patches = {
            "reconstruction": _rescaled(reconstructions[batch].float().to(device), norms),
            "mean": _rescaled(mean.to(device).expand_as(v), norms),
            "shuffled": _rescaled(vectors[other[batch]].to(device), norms),
            "zero": torch.zeros_like(v),
        }
        original, h, patched_runs = next_token_logprobs(model, ids, mask, layer, list(patches.values()))
        match = ((h - v).norm(dim=-1) / v.norm(dim=-1).clamp_min(1e-12)) < MATCH_TOLERANCE
        mismatched += int((~match).sum())
        top = original.argmax(dim=-1)
        for name, patched in zip(patches, patched_runs):
            kls[name].append(_kl(original, patched)[match].cpu())
            agree[name].append((patched.argmax(dim=-1) == top)[match].float().cpu())
        for row, i in enumerate(batch):
            if match[row]:
                per_row[i] = float(kls["reconstruction"][-1][int(match[:row].sum())])
    used = sum(len(x) for x in kls["reconstruction"])
    out: dict[str, Any] = {"n": used, "left_out": n - used, "left_out_mismatched": mismatched}
    if used == 0:
        return {**out, "kl": None}, per_row
    mean_kl = {k: float(torch.cat(v).mean()) for k, v in kls.items()}
    out.update(
        {
            "kl": mean_kl["reconstruction"],
            "kl_mean_baseline": mean_kl["mean"],
            "kl_shuffled_baseline": mean_kl["shuffled"],
            "kl_zero_baseline": mean_kl["zero"],
            "recovered": 1.0 - mean_kl["reconstruction"] / mean_kl["mean"] if mean_kl["mean"] > 0 else None,
            "top1_agree": float(torch.cat(agree["reconstruction"]).mean()),
            "top1_agree_mean_baseline": float(torch.cat(agree["mean"]).mean()),
        }
    )
    return out, per_row
