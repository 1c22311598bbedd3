"""`nla datagen`: activations + teacher explanations -> parquet splits with `nla_meta.yaml` sidecars.

Single process (CPU or one GPU):

    nla datagen --config configs/embedded.yaml --output_dir runs/demo

Several GPUs (extraction chunks are sharded across processes; the main process then asks the
teacher and writes the splits; a big teacher is best served separately, `--teacher openai`):

    accelerate launch --multi_gpu --num_processes 8 -m nla.cli datagen --config configs/x.yaml \
        --teacher openai --teacher_base_url http://localhost:8000/v1 --teacher_model NAME

Steps: stream documents -> choose positions (seeded per document) -> block-K outputs, raw fp32,
in resumable chunks under `<data_dir>/.work/` -> choose the marker (a single-token character
absent from the corpus) -> split documents (stable hash of seed and doc id against
`split_fractions`) -> teacher explanations for the av_sft/ar_sft/val/test rows (cached) ->
`<data_dir>/<split>.parquet` + sidecars, and `datagen_summary.json`. A rerun after a crash redoes
neither finished chunks nor cached teacher calls.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from nla import __version__
from nla.core import templates
from nla.core.claims import Row
from nla.core.config import ConfigError, NLAConfig
from nla.core.io import atomic_write_text, remove_temp_files
from nla.core.sidecar import Meta, SidecarError, TokenSpec, dataset_meta_path
from nla.core.tracking import Tracker
from nla.data.corpus import iter_documents
from nla.data.extract import (
    ChunkStore,
    Rows,
    ScanResult,
    choose_marker,
    norm_stats,
    scan_and_extract,
    stable_int,
    stable_unit,
)
from nla.data.paired import Paired, extract_paired, paired_dir, subset
from nla.data.splits import SPLITS, TEACHER_SPLITS, split_columns, split_path, write_split
from nla.data.teacher import Explained, Teacher, TeacherCache, explain, make_teacher
from nla.models.backbone import default_layer, text_config
from nla.models.sources import pick_device

SUMMARY = "datagen_summary.json"
TAIL_CHARS = 160  # context shown next to sample explanations


class DatagenError(ConfigError):
    """datagen cannot go on; the message says how to fix it (finished chunks are kept)."""


def split_of(seed: int, doc_id: str, weights: list[float]) -> str:
    """The split of a document: a stable hash of (seed, doc_id) against the cumulative weights."""
    u, total = stable_unit("split", seed, doc_id), 0.0
    for name, w in zip(SPLITS, weights):
        total += w
        if u < total:
            return name
    return next(name for name, w in zip(reversed(SPLITS), reversed(weights)) if w > 0)  # rounding at u ~ 1


def resolve_layer(cfg: NLAConfig, n_layers: int) -> int:
    from nla.models.backbone import layer_problem

    layer = cfg.model.layer if cfg.model.layer is not None else default_layer(n_layers)
    problem = layer_problem(layer, n_layers)
    if problem:
        raise DatagenError(f"{cfg.model.model}: {problem}; pass --layer in range (default: {default_layer(n_layers)}).")
    return layer


def _prepare(cfg: NLAConfig, state, work: Path, teacher: Teacher | None):
    """Everything that can fail before the extraction, checked before it: the model and tokenizer,
    the layer, the chat template, the teacher (main process) -> (model, tokenizer, layer, teacher).
    Also removes files torn by a killed run."""
    from nla.models.sources import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(
        cfg.model, cfg.run.device if state.num_processes == 1 else str(state.device)
    )
    layer = resolve_layer(cfg, text_config(model.config).num_hidden_layers)
    try:
        templates.require_chat_template(tok)
    except templates.NoChatTemplate as err:
        raise DatagenError(f"{cfg.model.model}: {err}.") from None
    if state.is_main_process:  # chunk or split files torn by a killed run; no process writes yet
        for folder in (work, cfg.data_dir):
            remove_temp_files(folder)
    if state.num_processes > 1:
        state.wait_for_everyone()
    if state.is_main_process:
        teacher = teacher or make_teacher(cfg, model, tok)
        teacher.check()  # an unreachable endpoint fails now, not after the extraction
    return model, tok, layer, teacher


def run(cfg: NLAConfig, teacher: Teacher | None = None) -> dict[str, Any]:
    """Extract, explain, split and write; returns the numbers the demo prints (see module docstring)."""
    started = time.perf_counter()
    state = _process_state(cfg)
    work = cfg.data_dir / ".work"
    model, tok, layer, teacher = _prepare(cfg, state, work, teacher)
    fmt = getattr(teacher, "format", None)  # the extractive teacher's: its fact claims need the model's prediction
    predict_next = fmt is not None and "next" in fmt.claim_types
    store = ChunkStore(
        work,
        {
            "model": cfg.model.model,
            "layer": layer,
            "dtype": cfg.model.dtype,
            "max_doc_tokens": cfg.data.max_doc_tokens,
            "min_position": cfg.data.min_position,
            "positions_per_doc": cfg.data.positions_per_doc,
            "seed": cfg.run.seed,
            **({"predict_next": True} if predict_next else {}),
        },
    )
    scan = _extract(cfg, tok, model, layer, store, state)
    if scan is None:  # a non-main process: its chunks are on disk, the main process does the rest
        return {}
    spec = choose_marker(tok, scan.seen_chars, scan.seen_ids)
    rows, paired = scan.rows, None
    if cfg.data.paired_model:  # before the teacher: rows without a partner in B are dropped, never explained
        del model  # A's forwards are done: B's copy takes its place
        paired = _pair(cfg, tok, rows, scan, work, store.identity)
        rows = subset(rows, paired.keep)
        _check_paired(cfg, paired)
    vectors = rows.matrix()
    splits = [split_of(cfg.run.seed, d, cfg.data.split_weights) for d in rows.doc_id]
    check_split_documents(rows.doc_id, splits, cfg.data.split_weights)  # before any teacher call
    need = [i for i, s in enumerate(splits) if s in TEACHER_SPLITS]  # RL rows get no explanation
    tails = [rows.context[i][-cfg.teacher.teacher_context_chars :] for i in need]
    explained = explain(teacher, tails, TeacherCache(work / "teacher_cache.jsonl"), cfg.logging.progress)
    explanation: list[str | None] = [None] * len(rows)
    for i, e in zip(need, explained.explanations):
        explanation[i] = e if e is None or fmt is None else fmt.with_facts(e, Row(rows.context[i], rows.next_token[i]))
    check_teacher_answers(teacher, explained, [splits[i] for i in need], cfg.teacher.teacher_malformed_warn)
    norms = norm_stats(vectors)
    extra = _meta_extra(cfg, store, teacher, explained, norms)
    if paired is not None:
        extra["paired"] = {**paired.record(cfg.model.model, layer), "role": "a"}
    for name in SPLITS:  # a paired dataset from an earlier run must not outlive the rows it paired
        stale = split_path(paired_dir(cfg.data_dir), name)
        stale.unlink(missing_ok=True)
        dataset_meta_path(stale).unlink(missing_ok=True)
    counts = _write_splits(cfg.data_dir, rows, vectors, splits, explanation, spec, layer, cfg.model.model, extra)
    if paired is not None:  # B's dataset: the same rows, splits and explanations; B's vectors and marker
        b_vectors = paired.rows.matrix()
        b_norms = norm_stats(b_vectors)
        b_extra = json.loads(json.dumps(extra)) | {
            "dataset_id": f"{extra['dataset_id']}-paired-L{paired.layer}",
            "activation_norms": b_norms,
            "suggested_injection_scale": b_norms["p75"],
            "paired": {**paired.record(cfg.model.model, layer), "role": "b"},
        }
        paired_dir(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        _write_splits(
            paired_dir(cfg.data_dir),
            paired.rows,
            b_vectors,
            splits,
            explanation,
            paired.spec,
            paired.layer,
            paired.model,
            b_extra,
        )
    samples = [(rows.context[i][-TAIL_CHARS:], explanation[i]) for i in need if explanation[i] is not None][:3]
    result = {
        "rows": counts,
        "norms": norms,
        "suggested_injection_scale": norms["p75"],
        "marker": spec.injection_char,
        "samples": samples,
        "activations_per_s": scan.activations_per_s,
        "teacher_tokens_per_s": explained.tokens_per_s,
        "data_dir": str(cfg.data_dir),
        "paired": None
        if paired is None
        else {**paired.record(cfg.model.model, layer), "extract_s": round(paired.seconds, 2)},
    }
    summary = {
        **result,
        "marker_token_id": spec.injection_token_id,
        "layer": layer,
        "docs": scan.n_docs,
        "skipped_short_docs": scan.n_skipped_short,
        "chunks_new": scan.n_chunks_new,
        "chunks_reused": scan.n_chunks_reused,
        "teacher_requested": explained.n_requested,
        "teacher_malformed": explained.n_malformed,
        "teacher_calls": explained.n_calls,
        "teacher_raw_samples": explained.samples,
        "extract_s": round(scan.extract_seconds, 2),
        "teacher_s": round(explained.seconds, 2),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    # last: marks completion
    atomic_write_text(cfg.data_dir / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False))
    _log(cfg, summary)
    return {**result, "wall_s": summary["wall_s"], "summary_path": str(cfg.data_dir / SUMMARY)}


def _pair(cfg: NLAConfig, tok, rows: Rows, scan: ScanResult, work: Path, identity: dict[str, Any]) -> Paired:
    """B's rows for A's (nla/data/paired.py): B loaded here, on A's device, and let go after."""
    from nla.models.sources import ModelSource

    source = ModelSource.of(cfg.model)
    path = source.resolve(cfg.data.paired_model)
    tok_b = source.tokenizer(path)
    model_b = source.causal_lm(path, cfg.model.dtype).to(pick_device(cfg.run.device)).eval()
    needed = set(rows.doc_id)
    texts = {
        d.doc_id: d.text
        for d in iter_documents(cfg.data.corpus, cfg.data.text_field, cfg.data.max_docs, cfg.model.allow_hub)
        if d.doc_id in needed
    }
    try:
        return extract_paired(
            rows,
            texts,
            tok,
            tok_b,
            model_b,
            cfg.data.paired_model,
            cfg.data.paired_layer,
            work,
            identity,
            cfg.data.max_doc_tokens,
            cfg.data.extract_batch_size,
            scan.seen_chars,
        )
    except SidecarError as err:
        raise DatagenError(f"--paired_model {cfg.data.paired_model}: {err}") from None


def _check_paired(cfg: NLAConfig, paired: Paired) -> None:
    if not paired.keep:
        raise DatagenError(
            f"none of the {paired.positions} positions has a partner in {cfg.data.paired_model}'s tokenization "
            "(no B token ends where the row's token ends); the two tokenizers never agree on a boundary here."
        )
    print(
        f"[nla datagen] paired with {cfg.data.paired_model} block {paired.layer}: {len(paired.keep)} of "
        f"{paired.positions} positions aligned ({paired.positions - len(paired.keep)} dropped)",
        file=sys.stderr,
    )


def check_split_documents(doc_ids: list[str], splits: list[str], weights: list[float]) -> None:
    """Refuse a split that has a share of `--split_fractions` but got no document (too few documents for
    the hash to reach it): every later stage needs its split, and an empty one surfaced only there."""
    docs = {name: set() for name in SPLITS}
    for d, name in zip(doc_ids, splits):
        docs[name].add(d)
    total = sum(weights)
    n_docs = len(set(doc_ids))
    for name, weight in zip(SPLITS, weights):
        if weight > 0 and not docs[name]:
            share = weight / total
            raise DatagenError(
                f"split {name!r} got none of the {n_docs} documents (its share {share:.2f} of "
                f"--split_fractions): use --max_docs {max(n_docs + 1, int(np.ceil(3 / share)))} or more, "
                f"or a larger share for {name}; the extracted chunks are kept."
            )


def check_teacher_answers(teacher: Teacher, explained: Explained, splits: list[str], warn_above: float) -> None:
    """Refuse a dataset whose teacher answers are unusable: a teacher split whose every answer is
    malformed (it would be written empty, and the next stage is where one would find out); warn
    when more than `warn_above` of all answers are malformed. The answers stay in the cache, so a
    rerun with a fixed prompt or --teacher_prefill asks only for what changed."""
    n, bad = explained.n_requested, explained.n_malformed
    if not n or not bad:
        return
    sample = (explained.malformed_samples or [""])[0][:160]
    empty = sorted(set(splits) - {s for s, e in zip(splits, explained.explanations) if e is not None})
    hint = (
        "try --teacher_prefill true (a vLLM server continues the opening tag), "
        if getattr(teacher, "role", None) == "teacher" and not getattr(teacher, "prefill", "")
        else ""
    )
    if empty:
        raise DatagenError(
            f"teacher {teacher.name!r}: every answer for split(s) {', '.join(empty)} was malformed "
            f"({bad} of {n} answers), e.g. {sample!r}; {hint}use a stronger model or raise "
            "--teacher_max_new_tokens (the answers are cached: a rerun asks only for what changed)."
        )
    if bad / n > warn_above:
        samples = "; ".join(repr(a[:100]) for a in explained.malformed_samples[:3])
        print(
            f"[nla datagen] warning: {bad} of {n} teacher answers ({bad / n:.0%}) were malformed and their rows "
            f"dropped (more than --teacher_malformed_warn {warn_above:.0%}), e.g. {samples}",
            file=sys.stderr,
        )


def _process_state(cfg: NLAConfig):
    from accelerate import PartialState

    # without CUDA, Accelerate joins the process group only with cpu=True (else each process runs alone)
    return PartialState(cpu=pick_device(cfg.run.device).type == "cpu")


def _extract(cfg: NLAConfig, tok, model, layer: int, store: ChunkStore, state) -> ScanResult | None:
    """This process's chunks; with several processes the main one then reads them all (the others get None)."""
    own = _scan(cfg, tok, model, layer, store, (state.process_index, state.num_processes), state.is_main_process)
    scan = own
    if state.num_processes > 1:
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        scan = _scan(cfg, tok, model, layer, store, (0, 1), False)  # every chunk is on disk now: reads only
        scan.n_chunks_new, scan.rows_new, scan.extract_seconds = own.n_chunks_new, own.rows_new, own.extract_seconds
    _check_scan(cfg, scan)
    return scan


def _scan(cfg: NLAConfig, tok, model, layer: int, store: ChunkStore, shard: tuple[int, int], show: bool) -> ScanResult:
    documents = iter_documents(cfg.data.corpus, cfg.data.text_field, cfg.data.max_docs, cfg.model.allow_hub)
    return scan_and_extract(
        documents,
        tok,
        model,
        layer,
        store,
        max_doc_tokens=cfg.data.max_doc_tokens,
        positions_per_doc=cfg.data.positions_per_doc,
        min_position=cfg.data.min_position,
        seed=cfg.run.seed,
        batch_size=cfg.data.extract_batch_size,
        total=cfg.data.max_docs,
        show_progress=show and cfg.logging.progress,
        shard=shard,
    )


def _check_scan(cfg: NLAConfig, scan: ScanResult) -> None:
    if cfg.data.max_docs is not None and 0 < scan.n_docs < cfg.data.max_docs:
        print(
            f"[nla datagen] note: --max_docs {cfg.data.max_docs} but corpus {cfg.data.corpus!r} has only "
            f"{scan.n_docs} documents; using all of them (builtin:python has ~1,550).",
            file=sys.stderr,
        )
    if scan.n_docs == 0:
        raise DatagenError(
            f"corpus {cfg.data.corpus!r} yielded no documents (all empty?); point --corpus at "
            "non-empty text, or check --text_field."
        )
    if len(scan.rows) == 0:
        raise DatagenError(
            f"all {scan.n_docs} documents are too short: none has a non-special token at index >= "
            f"min_position={cfg.data.min_position} within max_doc_tokens={cfg.data.max_doc_tokens}; "
            "lower --min_position or raise --max_doc_tokens, or use longer documents."
        )


def _meta_extra(
    cfg: NLAConfig, store: ChunkStore, teacher: Teacher, explained: Explained, norms: dict[str, float]
) -> dict[str, Any]:
    model_name = Path(cfg.model.model).name.replace(":", "-")
    pairing = [cfg.data.paired_model, cfg.data.paired_layer] if cfg.data.paired_model else []  # its rows differ
    fingerprint = stable_int(store.identity, cfg.data.corpus, cfg.data.max_docs, teacher.identity, *pairing)
    dataset_id = f"{model_name}-L{store.identity['layer']}-{fingerprint:016x}"
    return {
        "dataset_id": dataset_id,
        "extraction": {
            "corpus": cfg.data.corpus,
            "positions_per_doc": cfg.data.positions_per_doc,
            "min_position": cfg.data.min_position,
            "max_doc_tokens": cfg.data.max_doc_tokens,
            "seed": cfg.run.seed,
            "dtype": cfg.model.dtype,
        },
        "activation_norms": norms,
        "suggested_injection_scale": norms["p75"],
        "teacher": {
            "provider": teacher.identity.split(":", 1)[0],
            "model": getattr(teacher, "name", ""),
            "claims": list(getattr(teacher, "claims", None) or []) or None,
            "identity": teacher.identity,
            "n_requested": explained.n_requested,
            "n_malformed": explained.n_malformed,
        },
        "provenance": {
            "created_by": "nla datagen",
            "nla_version": __version__,
            "split_fractions": cfg.data.split_fractions,
            "teacher_context_chars": cfg.teacher.teacher_context_chars,
        },
    }


def _write_splits(
    data_dir: Path,
    rows: Rows,
    vectors: np.ndarray,
    splits: list[str],
    explanation: list[str | None],
    spec: TokenSpec,
    layer: int,
    base_model: str,
    extra: dict[str, Any],
) -> dict[str, int]:
    """One parquet + sidecar per split; rows of teacher splits whose answer was malformed are dropped."""
    # an interrupted write must leave no mix of old and new splits (the summary, written last, marks completion)
    stale = [data_dir / SUMMARY] + [
        p for n in SPLITS for p in (split_path(data_dir, n), dataset_meta_path(split_path(data_dir, n)))
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    av_message = templates.av_user_message(spec.injection_char)
    counts = {}
    for name in SPLITS:
        idx = [
            i for i, s in enumerate(splits) if s == name and (name not in TEACHER_SPLITS or explanation[i] is not None)
        ]
        columns = split_columns(name, rows, idx, layer, explanation, av_message)
        # a deep copy per split
        meta = Meta(
            "nla_dataset",
            spec,
            d_model=vectors.shape[1],
            layer_index=layer,
            base_model=base_model,
            extra=json.loads(json.dumps({**extra, "stage": name})),
        )
        write_split(split_path(data_dir, name), vectors[idx], columns, meta)
        counts[name] = len(idx)
    return counts


def _log(cfg: NLAConfig, summary: dict[str, Any]) -> None:
    tracker = Tracker(cfg, "datagen")
    metrics = {f"data/rows_{k}": v for k, v in summary["rows"].items()}
    metrics.update({f"data/norm_{k}": v for k, v in summary["norms"].items()})
    for key in (
        "suggested_injection_scale",
        "docs",
        "skipped_short_docs",
        "teacher_requested",
        "teacher_malformed",
        "activations_per_s",
        "teacher_tokens_per_s",
        "wall_s",
    ):
        if summary[key] is not None:
            metrics[f"data/{key}"] = summary[key]
    tracker.log(metrics, step=0)
    tracker.log_table("data/samples", ["context_tail", "explanation"], [list(s) for s in summary["samples"]], step=0)
    tracker.summary(metrics)
    tracker.finish()


def _rate(value: float | None, unit: str) -> str:
    return f"{value:.1f} {unit}" if value else f"- {unit} (all cached)"


def describe(out: dict[str, Any]) -> str:
    """A few readable lines: row counts, norm percentiles, marker, speeds, three (context tail, explanation) pairs."""
    n = out["norms"]
    lines = [
        f"datagen: {sum(out['rows'].values())} rows in {out['data_dir']} ("
        + ", ".join(f"{k} {v}" for k, v in out["rows"].items())
        + ")",
        f"activation norms: p50 {n['p50']:.2f}  p75 {n['p75']:.2f}  p95 {n['p95']:.2f}  mean {n['mean']:.2f}"
        f"  -> suggested injection_scale {out['suggested_injection_scale']:.2f}",
        f"marker {out['marker']!r}; {_rate(out['activations_per_s'], 'activations/s')}; "
        f"{_rate(out['teacher_tokens_per_s'], 'teacher tokens/s')}; {out['wall_s']:.0f} s",
    ]
    for context, expl in out["samples"]:
        lines.append(f"  ...{context[-80:]!r}\n      -> {expl}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from nla.stages.stage import start_stage

    cfg, _ = start_stage(argv, "datagen", folder=lambda c, _: c.data_dir)
    out = run(cfg)
    if out:  # (empty on the non-main processes of a multi-GPU run)
        print(describe(out))
    return 0
