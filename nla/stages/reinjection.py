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

from typing import Any

import torch
from torch import nn

from nla.data.splits import derangement
from nla.models.ar import pad_batch
from nla.models.patching import next_token_logprobs

MATCH_TOLERANCE = 1e-2  # relative error between the re-extracted and the stored activation


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
    rescale: bool = True,
) -> dict[str, Any]:
    """The report's `reinjection` section and one KL per row (None where the row was left out).

    `vectors` [n, d] raw activations; `reconstructions` [n, d] the AR's predictions (any scale),
    rescaled to each activation's norm; with `rescale=False` patched as given (e.g. an additive
    patch: the activation plus something)."""
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
            "reconstruction": _rescaled(reconstructions[batch].float().to(device), norms)
            if rescale
            else reconstructions[batch].float().to(device),
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
