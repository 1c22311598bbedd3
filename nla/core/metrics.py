"""Reconstruction metrics for AR predictions: pure functions, tensors in, floats/tensors out.

Shapes: `pred`, `target` are `[n, d]` (n rows, d = model width). Everything is computed in
fp32 so bf16 activations do not bias the numbers.

Conventions (the paper's):
  * Both vectors are normalised to the same norm `scale` (default sqrt(d)) and the squared
    error is averaged over d, so at the default scale MSE_nrm = 2 (1 - cos) exactly:
    0 = identical, 2 = orthogonal, 4 = opposite. At another scale s it is (s^2 / d) * 2 (1 - cos).
  * `fve_nrm` is the strict FVE: 1 - MSE / Var, Var = mean squared distance of the normalised
    targets from their own mean. `fve_vs_mean_pred` is the lenient one, against the baseline
    that predicts normalize(mean). Always report which one a number is.
  * Activations are anisotropic (a big shared direction), so raw cosine flatters a predictor of
    the mean direction; the centred metrics subtract the target mean first to remove that.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable

import torch

EPS = 1e-12
# Rows per chunk in top1_retrieval: bounds the [chunk, k, d] candidate tensor.
_RETRIEVAL_CHUNK = 256


def _scale(x: torch.Tensor, scale: float | None) -> float:
    """Default norm sqrt(d) makes MSE_nrm = 2 (1 - cos) exactly."""
    return math.sqrt(x.shape[-1]) if scale is None else float(scale)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be [n, d]; got {tuple(pred.shape)} and {tuple(target.shape)}.")


def normalize(v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Rescale each row of `v` ([..., d]) to L2 norm `scale` (default sqrt(d)), in fp32.

    A zero row stays zero (eps avoids 0/0) rather than becoming NaN.
    """
    v = v.float()
    norm = v.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return v / norm * _scale(v, scale)


def mse_nrm(pred: torch.Tensor, target: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Per-row MSE between normalised pred and target, averaged over d. `[n, d] x2 -> [n]`."""
    _check_pair(pred, target)
    s = _scale(pred, scale)
    return (normalize(pred, s) - normalize(target, s)).pow(2).mean(dim=-1)


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity. `[n, d] x2 -> [n]`; a zero row gives 0."""
    _check_pair(pred, target)
    return (normalize(pred, 1.0) * normalize(target, 1.0)).sum(dim=-1)


def target_mean(targets: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Mean of the normalised targets. `[n, d] -> [d]` (its norm is <= scale)."""
    return normalize(targets, scale).mean(dim=0)


def target_variance(targets: torch.Tensor, scale: float | None = None) -> float:
    """Strict Var: mean over rows of the squared distance (averaged over d) of the normalised
    targets from their mean. `[n, d] -> float`. At scale sqrt(d) it lies in [0, 1]."""
    t = normalize(targets, scale)
    return float((t - t.mean(dim=0)).pow(2).mean())


def fve_from_mse(mse, var: float):
    """1 - MSE / Var: a float, or a tensor of per-row MSEs -> per-row FVE (Var floored at EPS)."""
    return 1.0 - mse / max(float(var), EPS)


def fve_nrm(pred: torch.Tensor, target: torch.Tensor, scale: float | None = None, var: float | None = None) -> float:
    """Strict fraction of variance explained: 1 - mean MSE_nrm / Var. `[n, d] x2 -> float`.

    Pass `var` (e.g. from the training set) to compare runs on the same footing; by default it
    is the variance of the given targets.
    """
    s = _scale(pred, scale)
    if var is None:
        var = target_variance(target, s)
    return fve_from_mse(float(mse_nrm(pred, target, s).mean()), var)


def fve_vs_mean_pred(
    pred: torch.Tensor, target: torch.Tensor, scale: float | None = None, mean: torch.Tensor | None = None
) -> float:
    """Lenient FVE: 1 - MSE(pred) / MSE(normalize(mean) rescaled to scale, target). -> float.

    `mean` ([d]) defaults to target_mean(target). The raw mean is the MSE-optimal constant (its
    MSE is the strict Var); re-normalising it onto the sphere costs (s - |mean|)^2 / d more, so
    this baseline is easier to beat and the number is always >= fve_nrm for the same predictions.
    """
    s = _scale(pred, scale)
    if mean is None:
        mean = target_mean(target, s)
    baseline = mse_nrm(mean.float().expand_as(target), target, s).mean()
    return fve_from_mse(float(mse_nrm(pred, target, s).mean()), float(baseline))


def _centered(v: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """Normalise, subtract the (normalised-space) target mean, re-normalise. `[n, d] -> [n, d]`."""
    return normalize(normalize(v, scale) - mean.float(), scale)


def centered_cosine(
    pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Per-row cosine after subtracting the target mean from both. `[n, d] x2 -> [n]`.

    `mean` ([d]) lives in normalised space: pass target_mean(targets, scale) with the same
    scale (the default, computed from `target`). A constant prediction such as the mean scores
    ~0 on average over rows (centred targets average to zero), however high its raw cosine.
    """
    _check_pair(pred, target)
    s = _scale(pred, scale)
    if mean is None:
        mean = target_mean(target, s)
    return cosine(normalize(pred, s) - mean.float(), normalize(target, s) - mean.float())


def fve_centered(
    pred: torch.Tensor, target: torch.Tensor, scale: float | None = None, mean: torch.Tensor | None = None
) -> float:
    """Strict FVE on mean-centred, re-normalised vectors. `[n, d] x2 -> float`.

    Why re-normalise: a plain subtraction cancels in (pred - target), which would make this
    identical to fve_nrm. Re-normalising after centring scores only the direction of the
    deviation from the mean, so a predictor of the shared (anisotropic) direction scores like a
    constant guess (about -1 when the deviations are near-isotropic), not like its raw cosine.
    """
    _check_pair(pred, target)
    s = _scale(pred, scale)
    if mean is None:
        mean = target_mean(target, s)
    return fve_nrm(_centered(pred, mean, s), _centered(target, mean, s), s)


def _sample_others(n: int, rows: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """For each row index in `rows` ([c]) pick k distinct other row indices uniformly. -> [c, k]."""
    keys = torch.rand(rows.numel(), n, generator=generator)
    # Own row gets +inf so it is never among the k smallest keys: sampling without replacement.
    keys[torch.arange(rows.numel()), rows] = float("inf")
    return keys.topk(k, dim=1, largest=False).indices


def top1_retrieval(
    pred: torch.Tensor,
    targets: torch.Tensor,
    n_candidates: int = 16,
    generator: torch.Generator | None = None,
    scale: float | None = None,
) -> float:
    """Fraction of rows whose own target is the nearest (by MSE_nrm) of its candidates.

    pred, targets: `[n, d]`. Each row i is scored against targets[i] plus n_candidates - 1 other
    rows' targets, sampled without replacement (all other rows if there are fewer). Chance level
    is 1 / n_candidates. A tie counts as correct: an exact duplicate of the own target cannot be
    told apart, and should not be held against the AR.
    """
    _check_pair(pred, targets)
    n = pred.shape[0]
    if n == 0:
        return float("nan")
    k = min(n_candidates - 1, n - 1)
    if k <= 0:
        return 1.0  # nothing to confuse it with
    s = _scale(pred, scale)
    p, t = normalize(pred, s), normalize(targets, s)
    own = (p - t).pow(2).mean(dim=-1)
    hits = 0
    for start in range(0, n, _RETRIEVAL_CHUNK):
        rows = torch.arange(start, min(start + _RETRIEVAL_CHUNK, n))
        # Sampled on the CPU (where the generator lives), then moved to the vectors' device.
        others = _sample_others(n, rows, k, generator).to(p.device)  # [c, k]
        rows = rows.to(p.device)
        other_mse = (p[rows].unsqueeze(1) - t[others]).pow(2).mean(dim=-1)  # [c, k]
        hits += int((own[rows] <= other_mse.min(dim=1).values).sum())
    return hits / n


def _is_non_latin_letter(ch: str) -> bool:
    if not ch.isalpha() or ch.isascii():
        return False
    # Latin letters with diacritics (é, ñ, ß) are named "LATIN ..."; CJK, Cyrillic, etc. are not.
    return not unicodedata.name(ch, "").startswith("LATIN")


def non_latin_rate(texts: Iterable[str]) -> float:
    """Fraction of texts containing any letter outside the Latin/ASCII scripts (e.g. CJK).

    An AV that ignores the injected vector often drifts into another script, so this is a cheap
    failed-injection detector. Digits, punctuation and emoji are not letters and do not count.
    """
    texts = list(texts)
    if not texts:
        return 0.0
    return sum(any(_is_non_latin_letter(c) for c in t) for t in texts) / len(texts)


def summarize(
    pred: torch.Tensor,
    target: torch.Tensor,
    scale: float | None = None,
    var: float | None = None,
    mean: torch.Tensor | None = None,
) -> dict[str, float]:
    """All headline numbers for one eval set. `[n, d] x2 -> dict` of floats.

    Keys: mse (mean MSE_nrm), fve_nrm (strict), fve_vs_mean_pred (lenient), cos (mean cosine),
    fve_centered. `var` / `mean` default to the statistics of the given targets; pass training-set
    values to keep numbers comparable across eval sets.
    """
    s = _scale(pred, scale)
    if mean is None:
        mean = target_mean(target, s)
    return {
        "mse": float(mse_nrm(pred, target, s).mean()),
        "fve_nrm": fve_nrm(pred, target, s, var),
        "fve_vs_mean_pred": fve_vs_mean_pred(pred, target, s, mean),
        "cos": float(cosine(pred, target).mean()),
        "fve_centered": fve_centered(pred, target, s, mean),
    }
