"""What eval says about the explanations' text: are their claims true, and do they say more than
the position's token?

- Claim checks (`nla.core.claims`): each explanation split into the claims of its format and each
  checked against the row's context, with the chance level (the same checks against another
  row's context); with `--judge openai`, an LLM judge marks free-form claims (`nla.data.judge`).
- Collapse signals: distinct values per claim type, the most common one's share, explanations
  repeated verbatim, malformed claims; the teacher's own explanations of the same rows, where the
  data has them, are summarised the same way (a claim is not collapsed if the teacher's labels are
  as concentrated).
- Text-free baselines (`nla.core.lookup`): the mean training vector per last token and per last two
  tokens, from the dataset's training splits (the rows the AR and AV trained on), scored exactly
  like the NLA. Not computed, with the reason, when there is no training split at hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nla.core import claims, seeds
from nla.core.lookup import LOOKUPS, lookup_predict
from nla.core.sidecar import SidecarError, dataset_meta_path, read_meta
from nla.data.judge import judge_claims, make_judge
from nla.data.splits import derangement, load_split, split_path

TRAINING_SPLITS = ("av_sft", "ar_sft", "rl")  # what the AV and AR trained on (warm starts and RL)


def explanation_format(data_path: Path | None, av_meta_extra: dict[str, Any]) -> claims.ExplanationFormat:
    """The eval data's teacher format (its sidecar's `teacher` record), else the one the AV trained on
    (its sidecar's `training.explanation_format`), else free text."""
    if data_path is not None:
        return claims.format_for(claims.format_record(read_meta(dataset_meta_path(data_path)).extra))
    return claims.trained_format(av_meta_extra)


def claim_checks(
    cfg, fmt: claims.ExplanationFormat, explanations: list, contexts: list, teacher: list | None, cache_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """contexts: one `claims.Row` (or context string) per row -> (report["claims"], one {format_ok,
    claims[, judged]} per row)."""
    n = len(explanations)
    others = derangement(n, cfg.run.seed + seeds.CLAIM_CHANCE).tolist()
    report = claims.summarize(fmt, explanations, contexts, others)
    if teacher is not None and any(
        t is not None for t in teacher
    ):  # the same rows' teacher text: ~100% by construction
        report["teacher"] = claims.summarize(fmt, teacher, contexts, others)
    rows = [claims.mark(fmt, e, c) for e, c in zip(explanations, contexts)]
    judge = make_judge(cfg)
    if judge is not None:
        texts = [claims.context_text(c) for c in contexts]
        report["judged"], verdicts = judge_claims(
            judge,
            explanations,
            texts,
            others,
            cache_dir / "judge_cache.jsonl",
            cfg.judge.judge_context_chars,
            cfg.logging.progress,
        )
        for row, v in zip(rows, verdicts):
            row["judged"] = v
    return report, rows


def last_ids(tokenizer, contexts: list[str], k: int = 2) -> list[list[int]]:
    """The last `k` token ids of each context (the position's token last)."""
    return [ids[-k:] for ids in tokenizer(list(contexts), add_special_tokens=False)["input_ids"]] if contexts else []


def text_free_baselines(
    tokenizer, data_path: Path | None, vectors: torch.Tensor, contexts: list[str], layer: int, scorer
) -> dict[str, Any]:
    """The token and bigram lookups scored on the eval rows, or {"skipped": why}."""
    if data_path is None:
        return {"skipped": "the rows came from --texts: no training split to build the lookup from"}
    paths = [split_path(data_path.parent, s) for s in TRAINING_SPLITS]
    paths = [p for p in paths if p.is_file() and p != data_path]
    if not paths:
        return {"skipped": f"no training split ({', '.join(TRAINING_SPLITS)}) beside {data_path}"}
    ids, vecs, used = [], [], []
    for path in paths:
        split = load_split(path)
        if split.meta.layer_index != layer or split.vectors.shape[1] != vectors.shape[1]:
            raise SidecarError(
                f"{path}: layer {split.meta.layer_index}, width {split.vectors.shape[1]}, but the eval rows "
                f"are layer {layer}, width {vectors.shape[1]}: the splits beside {data_path} do not belong together."
            )
        if len(split):
            ids += last_ids(tokenizer, split.column("detokenized_text_truncated"))
            vecs.append(split.vectors)
            used.append(path.stem)
    if not vecs:
        return {"skipped": f"the training splits beside {data_path} are empty"}
    train = torch.cat(vecs)
    eval_ids = last_ids(tokenizer, contexts)
    out: dict[str, Any] = {"train_rows": len(train), "splits": used}
    for name, order in LOOKUPS.items():
        pred, level = lookup_predict(ids, train, eval_ids, order, scorer.scale)
        out[name] = {
            "fve_nrm": scorer.fve(pred, vectors),
            "top1_retrieval": scorer.headline(pred, vectors)["top1_retrieval"],
            "matched": sum(k == order for k in level) / len(level),
        }
    return out


def control_margin(report: dict[str, Any]) -> float | None:
    """fve_nrm minus the best of the five controls: what the real vector and the real text add (> 0 = signal)."""
    controls = [c["fve_nrm"] for c in report.get("controls", {}).values()]
    return report["fve_nrm"] - max(controls) if controls else None


def best_lookup(report: dict[str, Any]) -> tuple[str, float] | None:
    """(name, fve) of the stronger text-free baseline, None when none was computed."""
    found = [(k, report.get("baselines", {})[k]["fve_nrm"]) for k in LOOKUPS if k in report.get("baselines", {})]
    return max(found, key=lambda kv: kv[1]) if found else None


def lookup_margin(report: dict[str, Any]) -> float | None:
    """fve_nrm minus the stronger lookup's (> 0: the explanations carry more than the last tokens)."""
    best = best_lookup(report)
    return report["fve_nrm"] - best[1] if best else None
