"""`nla eval`'s scorer and controls: strict FVE and top-1 on fixed rows (`Scorer`), the five
controls, the length curve, and the rewritten-text controls (paraphrase, phrase order).

Pure functions of an `explain` (vectors -> texts) and a `predict` (texts -> vectors), so they are
tested on a pipeline whose answers are known; `paraphrase` is the one that loads a teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.core import metrics, seeds
from nla.core.claims import split_claims
from nla.core.config import ConfigError, NLAConfig
from nla.data.splits import derangement
from nla.data.teacher import LocalParaphraser, TeacherCache, make_teacher
from nla.data.teacher import explain as teacher_explain
from nla.models.pair import NLA

LENGTHS = (8, 16, 32, 64)
Predict = Callable[[list], torch.Tensor]  # explanations (str or None) -> [n, d]
Explain = Callable[[torch.Tensor], list]  # vectors [n, d] -> explanations (str or None)


# ---------------------------------------------------------------- scoring (pure)


@dataclass
class Scorer:
    """Strict FVE and friends at one scale and Var, so every number in a report is comparable."""

    scale: float
    var: float
    n_candidates: int = 16
    seed: int = 0

    def row_fve(self, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[n, d] x2 -> [n]: 1 - MSE_nrm(row) / Var (averages to `fve`)."""
        return metrics.fve_from_mse(metrics.mse_nrm(pred, targets, self.scale), self.var)

    def fve(self, pred: torch.Tensor, targets: torch.Tensor) -> float:
        return metrics.fve_nrm(pred, targets, self.scale, self.var)

    def headline(self, pred: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """The main numbers: strict and centred FVE, the lenient one (labelled), cosine, MSE, top-1."""
        g = torch.Generator().manual_seed(self.seed)
        s = metrics.summarize(pred, targets, self.scale, self.var)
        floor = self.fve(targets.float().mean(dim=0, keepdim=True).expand_as(targets), targets)
        return {
            "fve_nrm": s["fve_nrm"],
            "fve_centered": s["fve_centered"],
            "fve_vs_mean_pred": s["fve_vs_mean_pred"],
            "fve_floor": floor,
            "cos_mean": s["cos"],
            "mse_mean": s["mse"],
            "top1_retrieval": metrics.top1_retrieval(pred, targets, self.n_candidates, g, self.scale),
        }


def uninformative_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [2, d]: the zero vector and the rows' mean (the zero_vector / mean_vector controls)."""
    return torch.stack([torch.zeros_like(vectors[0]), vectors.float().mean(dim=0)]).to(vectors.dtype)


def control_fves(
    explain: Explain,
    predict: Predict,
    vectors: torch.Tensor,
    explanations: list,
    scorer: Scorer,
    deterministic: bool = False,
    uninformative_texts: list | None = None,
) -> dict[str, dict[str, float]]:
    """The five controls' FVE against the rows' own vectors [n, d] (n >= 2).

    AV side: shuffled_vector (another row's vector), zero_vector, mean_vector (one explanation
    each, broadcast to every row). AR side: empty_text, random_text (another row's explanation).
    `deterministic` (greedy decoding): the AV's text for row j's vector is the one it already wrote
    for row j, so shuffled_vector permutes `explanations` instead of generating them again, and
    `uninformative_texts` (what it wrote for `uninformative_vectors`, e.g. in the same generate
    call as the rows) is used as given.
    """
    n = vectors.shape[0]
    perm = derangement(n, scorer.seed)
    uninformative = uninformative_vectors(vectors)
    if deterministic:
        extra = uninformative_texts if uninformative_texts is not None else explain(uninformative)
        av_texts = [explanations[j] for j in perm.tolist()] + list(extra)
    else:
        av_texts = explain(torch.cat([vectors[perm], uninformative]))
    others = derangement(n, scorer.seed + seeds.CONTROL_PAIRING)
    ar_texts = av_texts + ["", *[explanations[i] for i in others.tolist()]]
    pred = predict(ar_texts)  # one batched AR pass: [n + 2 + 1 + n, d]
    parts = {
        "shuffled_vector": pred[:n],
        "zero_vector": pred[n : n + 1].expand(n, -1),
        "mean_vector": pred[n + 1 : n + 2].expand(n, -1),
        "empty_text": pred[n + 2 : n + 3].expand(n, -1),
        "random_text": pred[n + 3 :],
    }
    return {
        name: {"fve_nrm": scorer.fve(p, vectors), "top1_retrieval": scorer.headline(p, vectors)["top1_retrieval"]}
        for name, p in parts.items()
    }


def truncate_tokens(texts: list, tokenizer, n_tokens: int) -> list:
    """Keep the first `n_tokens` tokens of each explanation (None stays None)."""
    out = []
    for t in texts:
        if t is None:
            out.append(None)
            continue
        ids = tokenizer.encode(t, add_special_tokens=False)
        out.append(t if len(ids) <= n_tokens else tokenizer.decode(ids[:n_tokens]))
    return out


def length_curve(
    predict: Predict,
    texts: list,
    full_pred: torch.Tensor,
    targets: torch.Tensor,
    tokenizer,
    scorer: Scorer,
    lengths: tuple[int, ...] = LENGTHS,
) -> dict[str, float]:
    """FVE with explanations cut to each length, plus 'full' (`full_pred`: the AR's reading of the
    uncut texts, already computed). Only the rows a cut shortens are read again, in one AR pass."""
    cuts = [truncate_tokens(texts, tokenizer, k) for k in lengths]
    changed = [(c, i) for c, cut in enumerate(cuts) for i, t in enumerate(cut) if t != texts[i]]
    preds = full_pred.unsqueeze(0).repeat(len(lengths), 1, 1)  # [lengths, n, d]
    if changed:
        rows, cols = torch.tensor(changed).T
        preds[rows, cols] = predict([cuts[c][i] for c, i in changed]).to(preds.dtype)
    return {str(k): scorer.fve(p, targets) for k, p in zip([*lengths, "full"], [*preds, full_pred])}


def paraphrase_scores(
    paraphrased: list,
    originals: list,
    original_pred: torch.Tensor,
    predict: Predict,
    targets: torch.Tensor,
    scorer: Scorer,
) -> dict[str, Any]:
    """FVE of paraphrases vs the originals (`original_pred`: the AR's reading of them, already
    computed) on the rows where both exist; retained = ratio (None if orig <= 0)."""
    keep = [i for i, (p, o) in enumerate(zip(paraphrased, originals)) if p is not None and o is not None]
    asked = sum(o is not None for o in originals)
    return {
        "n": len(keep),
        "fail_rate": 1 - len(keep) / asked if asked else None,
        **rewritten_scores(paraphrased, keep, original_pred, predict, targets, scorer),
    }


def rewritten_scores(
    rewritten: list,
    keep: list[int],
    original_pred: torch.Tensor,
    predict: Predict,
    targets: torch.Tensor,
    scorer: Scorer,
) -> dict[str, Any]:
    """FVE of rewritten explanations on rows `keep` next to the originals' (already predicted);
    retained = ratio, None while the original FVE is <= 0 (or fewer than 2 rows: all None)."""
    out: dict[str, Any] = {"fve_nrm": None, "fve_original": None, "fve_retained": None}
    if len(keep) < 2:
        return out
    sub = targets[keep]
    out["fve_nrm"] = scorer.fve(predict([rewritten[i] for i in keep]), sub)
    out["fve_original"] = scorer.fve(original_pred[keep], sub)
    if out["fve_original"] > 0:
        out["fve_retained"] = out["fve_nrm"] / out["fve_original"]
    return out


# ---------------------------------------------------------------- paraphrase control


def reverse_claims(text: str) -> str:
    """Model-free stand-in for a paraphrase: the same claims in reverse order (the paper: order barely matters)."""
    return "; ".join(reversed(split_claims(text))) or text


def shuffle_claims(text: str, seed: int) -> str | None:
    """The same phrases in another order (seeded; never the original order), or None when the text
    has fewer than two phrases to reorder."""
    claims = split_claims(text)
    if len(claims) < 2:
        return None
    order = derangement(len(claims), seed).tolist()
    return "; ".join(claims[i] for i in order)


def order_shuffled_scores(
    explanations: list, original_pred: torch.Tensor, predict: Predict, targets: torch.Tensor, scorer: Scorer
) -> dict[str, Any]:
    """The order-shuffle control: each explanation's phrases reordered (seeded per row), re-scored
    by the same AR on the rows that have two or more phrases. FVE that holds up means the AR reads
    what the phrases say, not where they stand; retained = ratio (None if the original <= 0)."""
    shuffled = [shuffle_claims(e, scorer.seed + i) if e else None for i, e in enumerate(explanations)]
    keep = [i for i, s in enumerate(shuffled) if s is not None]
    return {
        "n": len(keep),
        **rewritten_scores(shuffled, keep, original_pred, predict, targets, scorer),
        "example": [explanations[keep[0]], shuffled[keep[0]]] if keep else None,
    }


def paraphrase(cfg: NLAConfig, nla: NLA, texts: list, cache_path: Path) -> tuple[list, str]:
    """-> (one paraphrase per text, None where the text or the teacher's answer is missing; the method used)."""
    todo = [t for t in texts if t is not None]
    if cfg.teacher.teacher == "extractive":
        return [
            None if t is None else reverse_claims(t) for t in texts
        ], "claims reversed (model-free; --teacher extractive)"
    if cfg.teacher.teacher == "openai":
        raise ConfigError(
            "the paraphrase control runs with --teacher local or extractive (the endpoint teacher has a "
            "fixed prompt); pass one of those, or --paraphrase_control false."
        )
    with nla.target_model() as model:  # the target model (AV adapter off) is the default local teacher
        base = make_teacher(cfg, model, nla.tokenizer)
        done = teacher_explain(
            LocalParaphraser.wrap(base), todo, TeacherCache(cache_path), show_progress=cfg.logging.progress
        )
    answers = iter(done.explanations)
    return [None if t is None else next(answers) for t in texts], f"teacher {base.identity}"
