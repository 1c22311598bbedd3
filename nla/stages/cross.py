"""`nla eval` of a cross pair: model A's AV writes, model B's AR reads; text as a channel between models.

    nla eval --av_checkpoint runs/cross/av/final --ar_checkpoint runs/cross/ar_b/final \\
        --data runs/cross/data/test.parquet [--oracle_ar runs/cross/ar_oracle_b/final] \\
        [--own_av runs/cross/b/av/final] --output_dir runs/cross/eval

Chosen by `nla eval` when the AR was trained on paired data (`nla train-ar --ar_model B`, its sidecar
records `paired`) and the AV belongs to the other model. The rows are A's test split and its twin
B's split in `<data_dir>/paired/` (nla/data/paired.py): same texts, same places.

Channels, each scored on the same rows by strict FVE on B's activation (B's AR's Var), top-1 among
16 candidates, and reinjection into B (the prediction patched into B at block K_B, next-token
KL(original ‖ patched) against the mean activation's; `recovered` = 1 − KL/KL_mean):
  - the NLA channel: A's AV explains A's activation, B's AR reads the text;
  - the linear translator A → B (ridge, λ on val, closed form; nla/core/translate.py), patched in
    place of B's activation at its norm, and added to it (B's activation + the translation);
  - B's own NLA (`--own_av`: B's AV explaining B's activation, read by the same AR);
  - B's context oracle (`--oracle_ar`: B's AR reading the raw context: the ceiling for text);
  - text-free: the token lookup on B, the mean (floor);
  - the text controls: B's AR reading "" and reading other rows' explanations; and the teacher's
    own text read by B's AR (what the channel would carry with a perfect AV).
Each channel's size (explanation tokens per vector against floats per vector) and whether a person
can read it (its claims checked against the context, with chance) sit next to it.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import torch

from nla.core import claims, templates
from nla.core.config import ConfigError
from nla.core.io import atomic_write_text
from nla.core.sidecar import SidecarError, read_meta
from nla.core.tracking import Tracker
from nla.core.translate import fit_translator
from nla.data.paired import check_paired, paired_split, same_rows
from nla.data.splits import derangement, load_split, split_path
from nla.models.ar import load_ar, mse_scale_of, read_ar_meta
from nla.models.av import load_av
from nla.models.pair import CheckpointPaths, model_folder, strict_variance
from nla.models.sources import ModelError, ModelSource, pick_device
from nla.stages.controls import Scorer
from nla.stages.faithfulness import TRAINING_SPLITS, claim_checks, explanation_format, text_free_baselines
from nla.stages.reinjection import reinjection_scores

EXAMPLE_ROWS = 20


def is_cross(paths: CheckpointPaths) -> bool:
    """Whether the AR reads text about another model's activation than the AV explains."""
    if paths.av is None or paths.ar is None:
        return False
    record = read_ar_meta(paths.ar).extra.get("paired")
    return bool(record) and read_meta(paths.av).base_model != record["model_b"]


def _rows(cfg, args, record: dict[str, Any]):
    """A's and B's splits, the same rows in the same order."""
    if args.texts is not None:
        raise ConfigError("a cross pair is evaluated on paired data (--data, or <data_dir>/test.parquet), not --texts.")
    path_a = Path(args.data) if args.data else split_path(cfg.data_dir, "test")
    path_b = paired_split(path_a)
    check_paired(path_b, record["model_b"], record["layer_b"])
    a = load_split(path_a, max_rows=cfg.eval.eval_max_rows, seed=cfg.run.seed)
    b = load_split(path_b, max_rows=cfg.eval.eval_max_rows, seed=cfg.run.seed)
    if not same_rows(a, b) or len(a) != len(b):
        raise SidecarError(f"{path_a} and {path_b} do not hold the same rows; rerun `nla datagen --paired_model`.")
    if len(a) < 2:
        raise ConfigError(f"{path_a} has {len(a)} rows; eval needs at least 2 (controls permute rows).")
    return a, b


def _check_extra_models(cfg, args, record: dict[str, Any]) -> None:
    """Before any work: --own_av must explain B's block and --oracle_ar be B's context oracle."""
    if args.own_av:
        own = read_meta(model_folder(args.own_av, "av"))
        if own.base_model != record["model_b"] or own.layer_index != record["layer_b"]:
            raise SidecarError(
                f"--own_av {args.own_av} explains block {own.layer_index} of {own.base_model!r}, "
                f"not block {record['layer_b']} of {record['model_b']!r}."
            )
    if cfg.eval.oracle_ar:
        oracle = read_ar_meta(model_folder(cfg.eval.oracle_ar, "ar"))
        if oracle.extra.get("ar_text") != "context" or oracle.base_model != record["model_b"]:
            raise SidecarError(
                f"--oracle_ar {cfg.eval.oracle_ar} is not B's context-oracle AR; train one with "
                "`nla train-ar --ar_model B --ar_text context` (-> <output_dir>/ar_oracle_b/final)."
            )


def _training_pairs(folder_a: Path, split_names) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in split_names:
        path = split_path(folder_a, name)
        if path.is_file():
            a, b = load_split(path), load_split(paired_split(path))
            if not same_rows(a, b):
                raise SidecarError(f"{path} and its paired split do not hold the same rows; rerun datagen.")
            xs.append(a.vectors), ys.append(b.vectors)
    if not xs:
        raise ConfigError(f"no {'/'.join(split_names)} split in {folder_a} to fit the translator on.")
    return torch.cat(xs), torch.cat(ys)


def _explain(verbalizer, vectors: torch.Tensor, temperature: float, max_new: int, batch: int):
    samples = [s for (s,) in verbalizer.verbalize(vectors, 1, temperature, max_new, batch_size=batch)]
    return [s.explanation for s in samples], samples


def evaluate_cross(cfg, args, paths: CheckpointPaths, out_dir: Path) -> dict[str, Any]:
    began = time.time()
    source = ModelSource.of(cfg.model)
    device = pick_device(cfg.run.device)
    ar, tok_b = load_ar(paths.ar, device=device, dtype=cfg.model.dtype, source=source)
    record = ar.meta.extra["paired"]
    av = load_av(paths.av, cfg.run.device, cfg.model.dtype, cfg.av.av_max_new_tokens, source)
    if av.meta.base_model != record["model_a"] or av.meta.layer_index != record["layer_a"]:
        raise SidecarError(
            f"AV {paths.av} explains block {av.meta.layer_index} of {av.meta.base_model!r}, but AR {paths.ar} was "
            f"trained on pairs from block {record['layer_a']} of {record['model_a']!r}; use the AV of that model."
        )
    _check_extra_models(cfg, args, record)
    a, b = _rows(cfg, args, record)
    a.meta.verify(av.tokenizer, where=str(a.path))
    b.meta.verify(tok_b, d_model=ar.d_model, where=str(b.path))
    xa, yb = a.vectors, b.vectors
    scale = mse_scale_of(ar)
    var, var_source = strict_variance(ar, yb, scale)
    scorer = Scorer(scale, var, cfg.eval.retrieval_candidates, cfg.run.seed)
    temp, max_new, bs = args.eval_temperature, cfg.av.av_max_new_tokens, cfg.eval.eval_batch_size
    timing: dict[str, float] = {}

    t0 = time.time()
    explanations, samples = _explain(av, xa, temp, max_new, bs)
    timing["verbalize_s"] = time.time() - t0
    predict = lambda texts: ar.predict([t or "" for t in texts], tok_b)  # noqa: E731
    channels: dict[str, dict[str, Any]] = {}
    preds: dict[str, torch.Tensor] = {}

    def add(name: str, pred: torch.Tensor, **info) -> None:
        preds[name] = pred
        channels[name] = {**scorer.headline(pred, yb), **info}

    def add_text(name: str, texts: list, label: str, **info) -> None:
        """A text channel: B's AR reads `texts`; its size is their mean length in B's tokens."""
        per_vector = sum(len(tok_b.encode(t, add_special_tokens=False)) if t else 0 for t in texts) / len(texts)
        add(name, predict(texts), label=label, size=f"{per_vector:.1f} tokens", tokens_per_vector=per_vector, **info)

    n = len(xa)
    add_text("nla", explanations, "text: A's AV -> B's AR (the NLA channel)")
    translator_x, translator_y = _training_pairs(a.path.parent, TRAINING_SPLITS)
    val_x, val_y = _training_pairs(a.path.parent, ("val",))
    translator = fit_translator(translator_x, translator_y, val_x, val_y)
    translated = translator(xa.float())
    add(
        "translator",
        translated,
        label=f"linear map A -> B (ridge {translator.ridge:.3g}, {len(translator_x)} training pairs)",
        size=f"{yb.shape[1]} floats",
        floats_per_vector=yb.shape[1],
    )
    if args.own_av:
        own = load_av(args.own_av, cfg.run.device, cfg.model.dtype, max_new, source)
        own_texts, _ = _explain(own, yb, temp, max_new, bs)
        add_text("own_nla", own_texts, "text: B's own AV -> B's AR (same-model NLA)", explanations=own_texts)
        del own
    contexts_b = [c or "" for c in b.columns["detokenized_text_truncated"]]
    if cfg.eval.oracle_ar:
        oracle, oracle_tok = load_ar(Path(cfg.eval.oracle_ar), device=device, dtype=cfg.model.dtype, source=source)
        oracle_pred = oracle.predict([templates.context_tail(c) for c in contexts_b], oracle_tok)
        add("oracle", oracle_pred, label="ceiling: B's AR reading the raw context", size="the context")
        del oracle
    teacher = b.columns.get("explanation")
    if teacher and all(t is not None for t in teacher):
        add("teacher_text", predict(teacher), label="the teacher's text -> B's AR (a perfect AV)", size="")
    perm = derangement(n, cfg.run.seed).tolist()
    add("empty_text", predict([""] * n), label="control: B's AR reading empty text", size="0 tokens")
    add(
        "random_text",
        predict([explanations[j] for j in perm]),
        label="control: B's AR reading another row's explanation",
        size="",
    )
    add("mean", yb.float().mean(0, keepdim=True).expand_as(yb), label="floor: B's mean activation", size="0")
    lookups = text_free_baselines(tok_b, b.path, yb, contexts_b, record["layer_b"], scorer)

    fmt = explanation_format(a.path, av.meta.extra)
    facts = [
        claims.Row(c or "", nt)
        for c, nt in zip(a.columns["detokenized_text_truncated"], a.columns.get("model_next_token") or [None] * n)
    ]
    claim_report, marks = claim_checks(cfg, fmt, explanations, facts, a.columns.get("explanation"), out_dir)
    t0 = time.time()
    reinjection = _reinject_all(cfg, source, record, tok_b, b, preds, translated)
    timing["reinjection_s"] = time.time() - t0
    row_fve = scorer.row_fve(preds["nla"], yb).tolist()
    rows = [
        {
            "doc_id": a.columns["doc_id"][i],
            "position_a": a.columns["position"][i],
            "position_b": b.columns["position"][i],
            "context": (a.columns["detokenized_text_truncated"][i] or "")[-200:],
            "explanation": explanations[i],
            "failed": samples[i].failed,
            "teacher_explanation": (teacher or [None] * n)[i],
            "fve_nrm_b": row_fve[i],
            **marks[i],
            **({"own_explanation": channels["own_nla"]["explanations"][i]} if "own_nla" in channels else {}),
        }
        for i in range(n)
    ]
    channels.get("own_nla", {}).pop("explanations", None)
    report = {
        "kind": "cross",
        "n": n,
        "paired": record,
        "checkpoint": {
            "av": str(paths.av),
            "ar": str(paths.ar),
            "own_av": args.own_av,
            "oracle_ar": cfg.eval.oracle_ar,
        },
        "source": str(a.path),
        "fve_definition": "strict on B: 1 − MSE/Var of B's normalised activations",
        "var": var,
        "var_source": var_source,
        "top1_chance": 1 / min(cfg.eval.retrieval_candidates, n),
        "channels": channels,
        "lookups": lookups,
        "reinjection": reinjection,
        "claims": claim_report,
        "extraction_fail_rate": sum(s.failed for s in samples) / n,
        "timing": timing,
    }
    report["wall_s"] = round(time.time() - began, 1)
    report["files"] = write_cross_report(report, rows, out_dir)
    tracker = Tracker(cfg, "eval")
    flat = flat_metrics(report)
    tracker.log(flat, 0)
    tracker.summary(flat)
    tracker.finish()
    return report


def _reinject_all(cfg, source, record, tok_b, b, preds, translated) -> dict[str, Any]:
    """Each channel's prediction patched into B (first `reinjection_rows` rows), and the translation added."""
    k = min(len(b), cfg.eval.reinjection_rows)
    if k == 0:
        return {"skipped": "--reinjection_rows 0"}
    try:
        path = source.resolve(record["model_b"])
        model = source.causal_lm(path, cfg.model.dtype).to(pick_device(cfg.run.device)).eval()
    except (ConfigError, ModelError) as err:
        return {"skipped": f"model B could not be loaded: {err}"}
    contexts = [c or "" for c in b.columns["detokenized_text_truncated"][:k]]
    positions = b.columns["position"][:k]
    yb = b.vectors[:k]
    out: dict[str, Any] = {}
    for name in ("nla", "translator", "own_nla", "oracle", "teacher_text"):
        if name in preds:
            out[name], _ = reinjection_scores(
                model, tok_b, contexts, positions, yb, preds[name][:k], record["layer_b"], cfg.data.extract_batch_size
            )
    out["translator_added"], _ = reinjection_scores(
        model,
        tok_b,
        contexts,
        positions,
        yb,
        yb.float() + translated[:k],
        record["layer_b"],
        cfg.data.extract_batch_size,
        rescale=False,
    )
    return out


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, c in report["channels"].items():
        for key in ("fve_nrm", "top1_retrieval"):
            out[f"eval/cross/{name}/{key}"] = c[key]
    for name, r in (report.get("reinjection") or {}).items():
        if isinstance(r, dict):
            for key in ("kl", "kl_mean_baseline", "recovered"):
                if r.get(key) is not None:
                    out[f"eval/cross/{name}/reinjection_{key}"] = r[key]
    for name, v in (report.get("lookups") or {}).items():
        if isinstance(v, dict) and "fve_nrm" in v:
            out[f"eval/cross/{name}/fve_nrm"] = v["fve_nrm"]
    out["eval/fve_nrm"] = report["channels"]["nla"]["fve_nrm"]
    out["eval/fve_floor"] = report["channels"]["nla"]["fve_floor"]
    out |= claims.flat(report["claims"], "eval/claims/")
    return out


def _f(x: Any, fmt: str = "+.3f") -> str:
    return "—" if x is None else format(x, fmt)


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(channel, strict FVE on B, top-1, reinjection KL (recovered), size, readable) per channel."""
    re_ = report.get("reinjection") or {}
    c = report["claims"]
    quote = next(iter(c["types"].values()), {}) if c.get("types") else {}
    readable = (
        f"yes: {_f(quote.get('accuracy'), '.0%')} of claims true (chance {_f(quote.get('chance'), '.0%')})"
        if quote.get("accuracy") is not None
        else "yes (claims unchecked)"
    )
    out = []
    for name, ch in report["channels"].items():
        r = re_.get(name) if isinstance(re_.get(name), dict) else {}
        kl = f"{_f(r.get('kl'), '.3f')} ({_f(r.get('recovered'), '+.2f')})" if r.get("kl") is not None else "—"
        read = (
            readable
            if name == "nla"
            else "no: floats"
            if name == "translator"
            else "yes (B's own words)"
            if name == "own_nla"
            else ""
        )
        out.append((ch["label"], _f(ch["fve_nrm"]), _f(ch["top1_retrieval"], ".2f"), kl, ch.get("size", ""), read))
        if name == "translator" and isinstance(re_.get("translator_added"), dict):
            r = re_["translator_added"]
            out.append(
                (
                    "  the same, added to B's activation",
                    "",
                    "",
                    f"{_f(r.get('kl'), '.3f')} ({_f(r.get('recovered'), '+.2f')})",
                    "",
                    "",
                )
            )
    for name, v in (report.get("lookups") or {}).items():
        if isinstance(v, dict) and "fve_nrm" in v:
            out.append((f"text-free: {name} on B", _f(v["fve_nrm"]), "", "", "", ""))
    return out


def format_table(report: dict[str, Any]) -> str:
    p = report["paired"]
    head = ("channel", "strict FVE on B", "top-1", "reinjection KL (recovered)", "size / vector", "readable")
    rows = table_rows(report)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip()  # noqa: E731
    mean_kl = next(
        (r.get("kl_mean_baseline") for r in (report.get("reinjection") or {}).values() if isinstance(r, dict)), None
    )
    return "\n".join(
        [
            f"cross pair: {p['model_a']} block {p['layer_a']} -> {p['model_b']} block {p['layer_b']}; "
            f"{report['n']} held-out rows ({p['aligned']} of {p['positions']} positions aligned in datagen)",
            line(head),
            *map(line, rows),
            f"(top-1 chance {report['top1_chance']:.3f}; reinjection: KL of B's next token with the prediction "
            f"in place of B's activation, mean activation patched: {_f(mean_kl, '.3f')})",
        ]
    )


def write_cross_report(report: dict[str, Any], rows: list[dict], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "report_json": out_dir / "report.json",
        "report_md": out_dir / "report.md",
        "report_html": out_dir / "report.html",
        "rows": out_dir / "rows.jsonl",
    }
    atomic_write_text(files["report_json"], json.dumps(report, indent=2, default=str))
    atomic_write_text(files["rows"], "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
    examples = _examples(rows)
    md = ["# Cross-model channel", "", "```", format_table(report), "```", "", f"## {len(examples)} random rows", ""]
    for r in examples:
        md += [
            f"- `…{r['context'][-60:]!r}`",
            f"  - A's AV: {r['explanation']!r} (fve on B {r['fve_nrm_b']:+.2f}; {_verdicts(r)})",
            f"  - teacher: {r['teacher_explanation']!r}",
            *([f"  - B's own AV: {r['own_explanation']!r}"] if "own_explanation" in r else []),
        ]
    atomic_write_text(files["report_md"], "\n".join(md) + "\n")
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table_rows(report)
    )
    items = "".join(
        f"<tr><td><code>{html.escape(r['context'][-80:])}</code></td><td>{html.escape(str(r['explanation']))}</td>"
        f"<td>{r['fve_nrm_b']:+.2f}</td><td>{html.escape(_verdicts(r))}</td>"
        f"<td>{html.escape(str(r['teacher_explanation']))}</td></tr>"
        for r in examples
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>cross-model channel</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px}"
        "table{border-collapse:collapse}</style><h1>Cross-model channel</h1>"
        f"<pre>{html.escape(format_table(report).splitlines()[0])}</pre><table><tr>"
        + "".join(
            f"<th>{h}</th>"
            for h in ("channel", "strict FVE on B", "top-1", "reinjection KL (recovered)", "size", "readable")
        )
        + f"</tr>{cells}</table><h2>{len(examples)} random rows</h2><table><tr><th>context</th>"
        f"<th>A's explanation</th><th>FVE on B</th><th>its claims</th><th>teacher</th></tr>{items}</table>"
    )
    atomic_write_text(files["report_html"], page)
    return {k: str(v) for k, v in files.items()}


def _verdicts(row: dict) -> str:
    """Each claim's check, e.g. `quote false`; or why there is none."""
    if row.get("failed"):
        return "no explanation extracted"
    marks = [f"{c['type']} {c['verdict']}" for c in row.get("claims") or []]
    return ", ".join(marks) or "no claims"


def _examples(rows: list[dict]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(rows), generator=g)[:EXAMPLE_ROWS].tolist()
    return [rows[i] for i in sorted(pick)]
