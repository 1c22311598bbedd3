"""`nla eval`: how much of an activation the explanations carry, with the controls that keep it honest.

    nla eval --checkpoint runs/demo/rl/final --data runs/demo/data/test.parquet --output_dir runs/demo/eval
    nla eval --av_checkpoint release/av --ar_checkpoint release/ar --texts docs.jsonl --output_dir out --independent_ar other/ar
    (multi-GPU: eval is a single-process job, minutes on one GPU for thousands of rows; run it plainly,
     not under `accelerate launch`, e.g. `CUDA_VISIBLE_DEVICES=0 nla eval ...` next to a training run)

Writes `<report_dir>/report.json`, `report.md`, `rows.jsonl` and PNG plots (`report_dir` defaults to
`--output_dir`). The AV explains each vector greedily (`--eval_temperature 0`); the AR reconstructs
the vector from the explanation; FVE is the strict one, 1 - MSE/Var of the normalised targets, with
Var from the AR sidecar (its training targets) when recorded, else from the eval targets.

Controls (each an FVE on the same rows): `shuffled_vector` (the AV sees another row's vector, the
AR must reconstruct the row's own; under greedy decoding that text is the one the AV already wrote
for the other row, so it is not generated twice), `zero_vector` / `mean_vector` (the AV sees one uninformative
vector for every row), `empty_text` (the AR reads ""), `random_text` (the AR reads another row's
explanation). A real NLA scores far above all five; a content-blind AR shows up as empty_text ~
real. Also: a paraphrase control (the teacher rewrites each explanation; FVE should barely move),
FVE with explanations cut to 8/16/32/64 tokens, top-1 retrieval among 16 candidate vectors,
and an independent AR (`--independent_ar`), since the co-trained AR flatters its own AV.
Ceilings: the AR reading the dataset's teacher explanations (`teacher_explanations`), and with
`--oracle_ar DIR` a context-oracle AR (`nla train-ar --ar_text context`) reading each row's raw
context (`oracle`, and `fraction_of_oracle` = (fve_nrm − floor) / (oracle − floor), the share of the
way from one constant guess to the oracle). Floor: `fve_floor`, the
strict FVE of the best constant prediction (the targets' mean direction); strict FVE is negative
below it, and a content-blind AR sits near it.
Reinjection (`--reinjection_rows`, default 32): each row's reconstruction, rescaled to the
activation's norm, patched into the target model at layer K and the last position; next-token
KL(original ‖ patched) next to the mean, another row's and the zero activation patched there
(`nla.stages.reinjection`). Skipped, with a note, where the target model cannot be loaded.
Failed explanations (no closing tag, the length cap, or a format the AV's grammar rejects:
`claims.read_answer`) are scored as the AR reading what was extracted, else "", as `nla rl`'s
held-out number is; `extraction_fail_rate` says how many. Claim checks, collapse signals and the
text-free lookups: `nla.stages.faithfulness`.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.core import claims, metrics, templates
from nla.core.config import ConfigError, NLAConfig
from nla.core.lookup import LOOKUPS
from nla.core.sidecar import SidecarError
from nla.core.tracking import Tracker, progress
from nla.data.extract import choose_positions
from nla.data.judge import make_judge
from nla.data.splits import load_split, split_path
from nla.models.ar import read_ar_meta
from nla.models.pair import NLA, CheckpointArgs, load_checked_ar, load_from_config, model_folder, option, resolve_paths
from nla.models.sources import ModelError
from nla.stages import cross
from nla.stages.controls import (
    Explain,
    Scorer,
    control_fves,
    length_curve,
    order_shuffled_scores,
    paraphrase,
    paraphrase_scores,
    uninformative_vectors,
)
from nla.stages.faithfulness import claim_checks, explanation_format, lookup_margin, text_free_baselines
from nla.stages.reinjection import reinjection_scores
from nla.stages.report import format_table, write_report
from nla.stages.stage import start_stage
from nla.stages.verbalize import extract_text_rows, read_texts

FVE_DEFINITION = "strict: 1 − MSE/Var of normalised targets"


@dataclass
class EvalArgs(CheckpointArgs):
    data: str | None = option(
        "A dataset split (.parquet + sidecar) to evaluate; unset (and no --texts): <data_dir>/test.parquet."
    )
    texts: str | None = option(
        "Or a .jsonl of rows with 'text': positions drawn as in datagen (min_position, positions_per_doc)."
    )
    report_dir: str | None = option("Where report.json/report.md/plots go; unset: --output_dir.")
    eval_temperature: float = option("AV sampling temperature for eval (0 = greedy).", 0.0)
    paraphrase_control: bool = option("Run the paraphrase control (the teacher rewrites each explanation).", True)
    own_av: str | None = option(
        "Cross pair only (an AR of --ar_model B): B's own AV, read by the same AR on the same rows (B's same-model NLA)."
    )


# ---------------------------------------------------------------- data


@dataclass
class EvalData:
    vectors: torch.Tensor  # [n, d] raw
    info: list[dict[str, Any]]  # doc_id, position, context per row
    teacher: list | None  # the dataset's teacher explanations, when it has them
    source: str
    path: Path | None = (
        None  # the split read (None: --texts): its sidecar names the format, its folder the training splits
    )


def load_eval_data(cfg: NLAConfig, args: EvalArgs, nla: NLA) -> EvalData:
    if args.data is not None and args.texts is not None:
        raise ConfigError("give --data or --texts, not both.")
    limit = cfg.eval.eval_max_rows
    if args.texts is not None:
        special = set(nla.tokenizer.all_special_ids)
        d = cfg.data

        def pick(ids: list[int], doc_id: str) -> list[int]:  # datagen's position rule
            return choose_positions(ids, special, d.positions_per_doc, d.min_position, cfg.run.seed, doc_id)

        vectors, info = extract_text_rows(
            nla, read_texts(args.texts, d.text_field), d.max_doc_tokens, d.extract_batch_size, pick
        )
        return EvalData(vectors[:limit], info[:limit], None, f"texts:{args.texts}")
    path = Path(args.data) if args.data else split_path(cfg.data_dir, "test")
    if not path.is_file():
        raise ConfigError(f"{path} not found: pass --data FILE.parquet or --texts FILE.jsonl (or run `nla datagen`).")
    split = load_split(path, max_rows=limit, seed=cfg.run.seed)
    if len(split) < 2:
        raise ConfigError(
            f"{path} has {len(split)} rows; eval needs at least 2 (controls permute rows). "
            "Use more documents (--max_docs) or a larger test share (--split_fractions)."
        )
    if split.meta.layer_index != nla.layer or split.vectors.shape[1] != nla.d_model:
        raise SidecarError(
            f"{path}: layer {split.meta.layer_index}, width {split.vectors.shape[1]}, but the checkpoint "
            f"explains layer {nla.layer}, d_model {nla.d_model}; evaluate on data from the same model and layer."
        )
    cols = split.columns
    n = len(split)
    contexts = cols.get("detokenized_text_truncated") or [""] * n
    last = [
        nla.tokenizer(c or "", add_special_tokens=False)["input_ids"][-1:] for c in contexts
    ]  # the position's token
    nexts = cols.get("model_next_token") or [None] * n  # the model's own next token, where datagen recorded it
    info = [
        {
            "doc_id": cols.get("doc_id", [None] * n)[i],
            "position": cols.get("position", [None] * n)[i],
            "context": contexts[i] or "",
            "token": nla.tokenizer.decode(last[i]),
            "next_token": nexts[i],
        }
        for i in range(n)
    ]
    return EvalData(split.vectors, info, cols.get("explanation"), f"data:{path}", path)


# ---------------------------------------------------------------- the evaluation


def _explainer(
    nla: NLA, temperature: float, max_new_tokens: int, enabled: bool, batch_size: int, samples_out: list | None = None
) -> Explain:
    """vectors -> explanations (None where nothing was extracted), `batch_size` rows per generate call
    with a progress bar; the Samples go to `samples_out`."""

    def explain(vectors: torch.Tensor) -> list:
        texts, bs = [], batch_size
        for start in progress(range(0, len(vectors), bs), enabled=enabled, desc="eval: AV", unit="batch"):
            for (s,) in nla.explain(vectors[start : start + bs], 1, temperature, max_new_tokens, batch_size=bs):
                texts.append(s.explanation)
                if samples_out is not None:
                    samples_out.append(s)
        return texts

    return explain


def explain_rows(cfg: NLAConfig, args: EvalArgs, nla: NLA, vectors: torch.Tensor) -> tuple[list, list, list | None]:
    """The AV's explanation of every row -> (explanations, Samples, the greedy texts of the two
    `uninformative_vectors` or None). Greedy, those two ride along in the rows' last generate call
    (two more rows there instead of a generate call of their own, ~4 s on the embedded model)."""
    n, greedy, samples = len(vectors), args.eval_temperature == 0, []
    explain = _explainer(
        nla,
        args.eval_temperature,
        cfg.av.av_max_new_tokens,
        cfg.logging.progress,
        cfg.eval.eval_batch_size + 2 * greedy,
        samples,
    )
    if not greedy:
        return explain(vectors), samples, None
    texts = explain(torch.cat([vectors, uninformative_vectors(vectors)]))
    return texts[:n], samples[:n], texts[n:]


def reinjection(cfg: NLAConfig, nla: NLA, data: EvalData, pred: torch.Tensor, row_kl: list) -> dict[str, Any]:
    """The reconstruction patched back into the target model on the first `reinjection_rows` rows (their
    KLs go into `row_kl`); {"skipped": why} when there is no target model to patch."""
    k = min(len(data.vectors), cfg.eval.reinjection_rows)
    try:
        with nla.target_model() as model:
            out, row_kl[:k] = reinjection_scores(
                model,
                nla.tokenizer,
                [i.get("context") or "" for i in data.info[:k]],
                [i.get("position") for i in data.info[:k]],
                data.vectors[:k],
                pred[:k],
                nla.layer,
                cfg.data.extract_batch_size,
                cfg.run.seed,
            )
        return out
    except (ConfigError, ModelError, SidecarError) as err:  # no target model here: the rest of the report stands
        print(f"[eval] reinjection skipped: {err}", file=sys.stderr)
        return {"skipped": str(err)}


def make_scorer(cfg: NLAConfig, nla: NLA, vectors: torch.Tensor) -> tuple[Scorer, str]:
    """(the Scorer, where its Var came from: `NLA.variance`)."""
    var, source = nla.variance(vectors)  # eval has >= 2 rows, so a Var
    return Scorer(nla.mse_scale, var, cfg.eval.retrieval_candidates, cfg.run.seed), source


def evaluate(
    cfg: NLAConfig, args: EvalArgs, nla: NLA, data: EvalData, cache_dir: Path
) -> tuple[dict[str, Any], list[dict]]:
    """All numbers of the report, plus one dict per row."""
    vectors, n = data.vectors, len(data.vectors)
    if n < 2:
        raise ConfigError(f"{data.source}: {n} row(s); eval needs at least 2 (controls compare rows).")
    scorer, var_source = make_scorer(cfg, nla, vectors)
    var = scorer.var
    show, timing, greedy = cfg.logging.progress, {}, args.eval_temperature == 0
    t0 = time.time()
    explanations, samples, uninformative_texts = explain_rows(cfg, args, nla, vectors)
    explain_controls = _explainer(nla, args.eval_temperature, cfg.av.av_max_new_tokens, show, cfg.eval.eval_batch_size)
    timing["verbalize_s"] = time.time() - t0
    pred = nla.predict(explanations)
    report: dict[str, Any] = {
        "n": n,
        "source": data.source,
        "checkpoint": {"av": str(nla.paths.av), "ar": str(nla.paths.ar)},
        "fve_definition": FVE_DEFINITION,
        "var": var,
        "var_source": var_source,
        "mse_scale": nla.mse_scale,
        "temperature": args.eval_temperature,
        "selection": "greedy" if greedy else "first_sample",
        "rl_reward": (nla.meta.extra.get("training") or {}).get("reward"),
        **scorer.headline(pred, vectors),
    }
    report["top1_chance"] = 1 / min(cfg.eval.retrieval_candidates, n)
    t0 = time.time()
    contexts = [i.get("context") or "" for i in data.info]
    fmt = explanation_format(data.path, nla.meta.extra)
    facts = [
        claims.Row(c, i.get("next_token")) for c, i in zip(contexts, data.info)
    ]  # what each claim is checked against
    report["claims"], marks = claim_checks(cfg, fmt, explanations, facts, data.teacher, cache_dir)
    report["baselines"] = text_free_baselines(nla.tokenizer, data.path, vectors, contexts, nla.layer, scorer)
    report["lookup_margin"] = lookup_margin(report)
    timing["claims_s"] = time.time() - t0  # with --judge, mostly the judge's requests
    t0 = time.time()
    report["controls"] = control_fves(
        explain_controls,
        nla.predict,
        vectors,
        explanations,
        scorer,
        deterministic=greedy,
        uninformative_texts=uninformative_texts,
    )
    timing["controls_s"] = time.time() - t0
    if data.teacher is not None and any(t is not None for t in data.teacher):
        keep = [i for i, t in enumerate(data.teacher) if t is not None]
        report["teacher_explanations"] = {
            "n": len(keep),
            "fve_nrm": scorer.fve(nla.predict([data.teacher[i] for i in keep]), vectors[keep]),
        }
    para = None
    if args.paraphrase_control:
        t0 = time.time()
        para, method = paraphrase(cfg, nla, explanations, cache_dir / "paraphrase_cache.jsonl")
        report["paraphrase"] = {
            "method": method,
            **paraphrase_scores(para, explanations, pred, nla.predict, vectors, scorer),
        }
        timing["paraphrase_s"] = time.time() - t0
    report["order_shuffled"] = order_shuffled_scores(explanations, pred, nla.predict, vectors, scorer)
    reinjection_kl: list = [None] * n
    if cfg.eval.reinjection_rows > 0:
        t0 = time.time()
        report["reinjection"] = reinjection(cfg, nla, data, pred, reinjection_kl)
        timing["reinjection_s"] = time.time() - t0
    lengths = [len(nla.ar_tokenizer.encode(e, add_special_tokens=False)) for e in explanations if e is not None]
    report["explanation_tokens_mean"] = sum(lengths) / len(lengths) if lengths else 0.0
    report["response_tokens_mean"] = sum(s.n_tokens for s in samples) / n
    report["fve_by_length"] = length_curve(nla.predict, explanations, pred, vectors, nla.ar_tokenizer, scorer)
    report["non_latin_rate"] = metrics.non_latin_rate(s.text for s in samples)
    report["extraction_fail_rate"] = sum(s.failed for s in samples) / n
    report["independent_ar"] = (
        independent_ar(cfg, nla, explanations, vectors, scorer) if cfg.eval.independent_ar else None
    )
    if cfg.eval.oracle_ar:
        report["oracle"] = oracle_scores(cfg, nla, data, scorer)
        report["fraction_of_oracle"] = fraction_of_oracle(
            report["fve_nrm"], report["oracle"]["fve_nrm"], report["fve_floor"]
        )
    report["timing"] = timing
    row_fve = scorer.row_fve(pred, vectors).tolist()
    rows = [
        {
            **info,
            "context": (info.get("context") or "")[-200:],
            "explanation": e,
            "failed": s.failed,
            "fve_nrm": f,
            "reinjection_kl": reinjection_kl[i],
            **marks[i],
            **({"response": s.text[:300]} if s.failed else {}),  # what a failed answer said (cap hit, tags missing)
            **({"teacher_explanation": data.teacher[i]} if data.teacher is not None else {}),
            **({"paraphrase": para[i]} if para is not None else {}),
        }
        for i, (info, e, s, f) in enumerate(zip(data.info, explanations, samples, row_fve))
    ]
    return report, rows


def independent_ar(
    cfg: NLAConfig, nla: NLA, explanations: list, vectors: torch.Tensor, scorer: Scorer, path: str | None = None
) -> dict[str, Any]:
    """Texts scored by a second AR (its own Var and scale when its sidecar has them): the same
    explanations by an independent AR, or (`path` = the oracle AR) the rows' raw contexts."""
    path = path or cfg.eval.independent_ar
    ar, tok = load_checked_ar(path, nla.verbalizer, str(nla.paths.av), cfg.run.device, cfg.model.dtype, nla.source)
    other = NLA(nla.verbalizer, ar, tok, nla.paths, source=nla.source)
    var, source = other.variance(vectors)
    s = Scorer(other.mse_scale, var, scorer.n_candidates, scorer.seed)
    pred = other.predict(explanations + [""])
    return {
        "path": path,
        "fve_nrm": s.fve(pred[:-1], vectors),
        "var": var,
        "var_source": source,
        "empty_text_fve_nrm": s.fve(pred[-1:].expand_as(vectors), vectors),
    }


# The oracle's row depends only on the oracle AR and the rows, not on the NLA under test, so the
# demo's SFT and RL evals (same rows, same oracle) compute it once: ~11 s on the embedded model.
_ORACLE_ROWS: dict[str, dict[str, Any]] = {}


def oracle_scores(cfg: NLAConfig, nla: NLA, data: EvalData, scorer: Scorer) -> dict[str, Any]:
    """The context-oracle AR reading the rows' raw context tails (remembered per oracle weights + rows)."""
    contexts = [templates.context_tail(i.get("context") or "") for i in data.info]
    folder = model_folder(cfg.eval.oracle_ar, "ar")
    key = hashlib.sha256(
        repr(
            (
                str(folder.resolve()),
                sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()),
                contexts,
                scorer.n_candidates,
                scorer.seed,
            )
        ).encode()
        + data.vectors.detach().cpu().numpy().tobytes()
    )
    digest = key.hexdigest()
    if digest not in _ORACLE_ROWS:
        _ORACLE_ROWS[digest] = independent_ar(cfg, nla, contexts, data.vectors, scorer, path=cfg.eval.oracle_ar)
    return dict(_ORACLE_ROWS[digest])


def fraction_of_oracle(fve: float, oracle: float, floor: float) -> float | None:
    """How far the NLA gets from the constant-guess floor to the oracle: (fve - floor) / (oracle - floor).

    Measured from the floor, not from 0: strict FVE is negative for any AR near the floor, so a
    plain ratio fve / oracle would call a slightly-better-than-constant NLA "-40% of the oracle".
    1 = the oracle's score, 0 = no better than one constant guess, < 0 = confidently wrong.
    None when the oracle itself is not above the floor."""
    return (fve - floor) / (oracle - floor) if oracle > floor else None


def check_extra_ars(cfg: NLAConfig) -> None:
    """Fail before any explaining when --independent_ar / --oracle_ar do not point at the right AR."""
    if cfg.eval.independent_ar:
        read_ar_meta(model_folder(cfg.eval.independent_ar, "ar"))
    if cfg.eval.oracle_ar:
        folder = model_folder(cfg.eval.oracle_ar, "ar")
        if read_ar_meta(folder).extra.get("ar_text") != "context":
            raise ConfigError(
                f"--oracle_ar {cfg.eval.oracle_ar}: {folder} is not a context-oracle AR (its sidecar lacks "
                "ar_text: context); train one with `nla train-ar --ar_text context` (-> <output_dir>/ar_oracle/final)."
            )


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """`eval/...` keys for metrics.jsonl / W&B (the README lists them)."""
    out = {
        f"eval/{k}": report[k]
        for k in (
            "fve_nrm",
            "fve_centered",
            "cos_mean",
            "top1_retrieval",
            "non_latin_rate",
            "extraction_fail_rate",
            "explanation_tokens_mean",
        )
    }
    out |= {f"eval/control/{k}": v["fve_nrm"] for k, v in report["controls"].items()}
    out |= {f"eval/fve_by_length/{k}": v for k, v in report["fve_by_length"].items()}
    para = report.get("paraphrase") or {}
    out |= {f"eval/paraphrase_{k}": para[k] for k in ("fve_nrm", "fve_retained") if para.get(k) is not None}
    re_ = report.get("reinjection") or {}
    out |= {
        f"eval/reinjection/{k}": re_[k]
        for k in ("kl", "kl_mean_baseline", "kl_shuffled_baseline", "kl_zero_baseline", "recovered", "top1_agree")
        if re_.get(k) is not None
    }
    order = report.get("order_shuffled") or {}
    if order.get("fve_nrm") is not None:
        out["eval/control/order_shuffled"] = order["fve_nrm"]
        if order.get("fve_retained") is not None:
            out["eval/order_shuffled_retained"] = order["fve_retained"]
    if report.get("independent_ar"):
        out["eval/independent_ar_fve_nrm"] = report["independent_ar"]["fve_nrm"]
    if report.get("teacher_explanations"):
        out["eval/teacher_fve_nrm"] = report["teacher_explanations"]["fve_nrm"]
    if report.get("oracle"):
        out["eval/oracle_fve_nrm"] = report["oracle"]["fve_nrm"]
        if report.get("fraction_of_oracle") is not None:
            out["eval/fraction_of_oracle"] = report["fraction_of_oracle"]
    out["eval/fve_floor"] = report["fve_floor"]
    claim_report = report.get("claims") or {}
    if claim_report:
        out |= claims.flat(claim_report, "eval/claims/")
    judged = claim_report.get("judged") or {}
    out |= {
        f"eval/claims/judged/{k}": judged[k]
        for k in ("accuracy", "chance", "contradicted", "uncheckable")
        if judged.get(k) is not None
    }
    out |= {f"eval/control/{k}": v["fve_nrm"] for k, v in (report.get("baselines") or {}).items() if k in LOOKUPS}
    if report.get("lookup_margin") is not None:
        out["eval/lookup_margin"] = report["lookup_margin"]
    return out


def run(
    cfg: NLAConfig, args: EvalArgs | None = None, nla: NLA | None = None, report_dir: str | Path | None = None
) -> dict[str, Any]:
    """Evaluate and write the report; returns the report dict (what report.json holds)."""
    args = args or EvalArgs()
    began = time.time()
    if args.checkpoint is None and cfg.av.av_checkpoint and cfg.ar.ar_checkpoint:
        paths = resolve_paths(None, cfg.av.av_checkpoint, cfg.ar.ar_checkpoint)
        if cross.is_cross(paths):  # A's AV, B's AR: nla/stages/cross.py
            return cross.evaluate_cross(cfg, args, paths, Path(report_dir or args.report_dir or cfg.output_dir))
    if args.own_av:
        raise ConfigError(
            "--own_av is for a cross pair: an AR trained with `nla train-ar --ar_model B` (--ar_checkpoint) and "
            "the other model's AV (--av_checkpoint)."
        )
    nla = nla or load_from_config(cfg, args.checkpoint, need_ar=True, target_model=args.target_model)
    if nla.ar is None:
        raise ConfigError("eval needs an AR: pass --checkpoint DIR holding ar/, or --ar_checkpoint DIR.")
    out_dir = Path(report_dir or args.report_dir or cfg.output_dir)
    check_extra_ars(cfg)
    if (judge := make_judge(cfg)) is not None:
        judge.check()  # an unreachable judge fails now, not after the explaining
    data = load_eval_data(cfg, args, nla)
    report, rows = evaluate(cfg, args, nla, data, out_dir)
    report["wall_s"] = round(time.time() - began, 1)
    report["files"] = write_report(report, rows, out_dir)
    step = int((nla.meta.extra.get("training") or {}).get("step") or 0)
    tracker = Tracker(cfg, "eval")
    tracker.log(flat_metrics(report), step)
    tracker.summary(flat_metrics(report))
    tracker.finish()
    return report


def main(argv: list[str]) -> int:
    cfg, (args,) = start_stage(
        argv, "eval", extra=[EvalArgs], folder=lambda c, ex: Path(ex[0].report_dir or c.output_dir)
    )
    report = run(cfg, args)
    print(cross.format_table(report) if report.get("kind") == "cross" else format_table(report))
    print(f"[eval] {report['n']} rows, {report['wall_s']}s -> {report['files']['report_md']}")
    return 0
