"""`nla verbalize`: explanations of activations from an NLA checkpoint (CLI and Python API).

    nla verbalize --checkpoint runs/demo/rl/final --text "def add(a, b): return a + b" --positions 3,7
    nla verbalize --checkpoint runs/demo/rl/final --texts docs.jsonl --num_samples 4 --rerank_with_ar
    nla verbalize --av_checkpoint release/av --ar_checkpoint release/ar --vectors acts.npy --verbalize_temperature 0 --out expl.jsonl
    (multi-GPU: a single-process job; run it plainly, e.g. `CUDA_VISIBLE_DEVICES=0 nla verbalize ...`)

Input: `--text` (every token position, or `--positions 3,7,12`), `--texts FILE.jsonl` (rows with
`text`, optional `doc_id` and `positions`), or `--vectors FILE` (parquet column
`activation_vector`, `.npy`, or `.safetensors` holding one tensor [n, d], raw). Text is run through
the target model (the AV sidecar's base model, or `--target_model`) to get the raw output of block
K (the sidecar's layer). Special tokens (BOS) are skipped; positions before the training data's
`min_position` decode badly (huge norms), which the AV was never shown.

With an AR in the checkpoint, every row gets `mse_nrm` and `fve_nrm` = 1 - MSE/Var (Var: the AR
sidecar's `ar_target_variance`, else the given vectors' own). `--rerank_with_ar` samples
`--num_samples` explanations and keeps the one the AR reconstructs best: such rows say
`selection: best_of_K_by_AR`, and their FVE is optimistic (chosen on the very number reported).

    from nla.stages.verbalize import explain_text, explain_vectors
    rows = explain_text("for i in range(3):", checkpoint="runs/demo/rl/final", positions=[5], temperature=0)
    rows[0]["explanation"], rows[0]["fve_nrm"]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nla.core import claims
from nla.core.config import ConfigError, NLAConfig
from nla.core.io import atomic_write_text
from nla.core.metrics import fve_from_mse, mse_nrm
from nla.data.extract import DocRecord, document_tokens, extract_vectors
from nla.models.pair import NLA, CheckpointArgs, load_from_config, load_nla, option
from nla.stages.report import html_page
from nla.stages.stage import start_stage


@dataclass
class VerbalizeArgs(CheckpointArgs):
    text: str | None = option("A text to explain at every token position (or at --positions).")
    texts: str | None = option(
        "A .jsonl file of rows with 'text' (key: --text_field), optional 'doc_id' and 'positions'."
    )
    vectors: str | None = option(
        "Raw activations: .parquet (column activation_vector), .npy, or .safetensors (one [n, d] tensor)."
    )
    positions: str | None = option("Token positions to explain, e.g. '3,7,12'; unset: every non-special token.")
    num_samples: int = option("Explanations sampled per vector.", 1)
    verbalize_temperature: float = option(
        "AV sampling temperature (0 = greedy; sampled explanations differ only above 0).", 1.0
    )
    rerank_with_ar: bool = option(
        "Keep the sample the AR reconstructs best (best-of-K; needs an AR; FVE is then optimistic).", False
    )
    out: str | None = option("Output JSONL; unset: <output_dir>/verbalize/explanations.jsonl.")
    html: bool = option("Also write the rows as a sortable, searchable page next to it (<out>.html).", True)

    def __post_init__(self) -> None:
        if self.verbalize_temperature < 0:
            raise ConfigError(f"--verbalize_temperature {self.verbalize_temperature}: must be >= 0 (0 = greedy).")


# ---------------------------------------------------------------- inputs


def parse_positions(spec: str | list[int] | None) -> list[int] | None:
    if spec is None or isinstance(spec, list):
        return spec
    try:
        positions = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--positions {spec!r}: give comma-separated token indices, e.g. 3,7,12.") from None
    if any(p < 0 for p in positions):
        raise ConfigError(f"--positions {spec!r}: indices must be >= 0.")
    return positions


def read_texts(path: str | Path, text_field: str = "text") -> list[dict[str, Any]]:
    """JSONL rows -> [{text, doc_id, positions (list or None)}]."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--texts {path}: file not found.")
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{i + 1}: not JSON ({err.msg}); write one object per line.") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise ConfigError(
                f"{path}:{i + 1}: needs a string field {text_field!r} (set --text_field for another key)."
            )
        docs.append(
            {
                "text": row[text_field],
                "doc_id": str(row.get("doc_id", f"{path.stem}-{i}")),
                "positions": parse_positions(row.get("positions")),
            }
        )
    if not docs:
        raise ConfigError(f"--texts {path}: no rows.")
    return docs


def read_vectors(path: str | Path, d_model: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """A vectors file -> ([n, d] float32 raw, one row-info dict per vector)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--vectors {path}: file not found.")
    rows: list[dict[str, Any]] | None = None
    if path.suffix == ".npy":
        vectors = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ConfigError(
                f"{path} holds {len(tensors)} tensors ({sorted(tensors)[:4]}); save exactly one [n, d] tensor."
            )
        vectors = next(iter(tensors.values())).float()
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "activation_vector" not in table.column_names:
            raise ConfigError(f"{path} has no column 'activation_vector' (columns: {table.column_names}).")
        col = table.column("activation_vector").combine_chunks()
        flat = np.asarray(col.flatten(), dtype=np.float32)
        vectors = torch.from_numpy(flat.reshape(len(col), -1).copy()) if len(col) else torch.zeros(0, d_model)
        keep = [c for c in ("doc_id", "position") if c in table.column_names]
        rows = [dict(zip(keep, vals)) for vals in zip(*(table.column(c).to_pylist() for c in keep))] if keep else None
    else:
        raise ConfigError(f"--vectors {path}: use .parquet, .npy or .safetensors.")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[1] != d_model:
        raise ConfigError(
            f"--vectors {path}: shape {tuple(vectors.shape)}, but the AV explains [n, {d_model}] vectors."
        )
    if not torch.isfinite(vectors).all():
        raise ConfigError(f"--vectors {path}: holds NaN/inf values.")
    return vectors, rows or [{"doc_id": path.stem, "position": i} for i in range(len(vectors))]


def extract_text_rows(
    nla: NLA,
    docs: list[dict[str, Any]],
    max_tokens: int,
    batch_size: int = 8,
    pick: Callable[[list[int], str], list[int]] | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Texts -> ([n, d] raw block-K outputs, row info {doc_id, position, token, context}).

    A doc's `positions` wins; else `pick(ids, doc_id)`; else every non-special token. Docs with no
    position left are skipped (the caller sees fewer rows).
    """
    tok = nla.tokenizer
    special = set(tok.all_special_ids)
    records, cut = [], []
    for doc in docs:
        ids, was_cut = document_tokens(tok, doc["text"], max_tokens)
        if was_cut:
            cut.append(doc["doc_id"])
        positions = doc.get("positions")
        if positions is None:
            positions = pick(ids, doc["doc_id"]) if pick else [i for i, t in enumerate(ids) if t not in special]
        bad = [p for p in positions if p >= len(ids)]
        if bad:
            raise ConfigError(
                f"doc {doc['doc_id']}: position {bad[0]} is beyond its {len(ids)} tokens "
                f"(texts are cut to max_doc_tokens={max_tokens})."
            )
        if positions:
            records.append(DocRecord(doc["doc_id"], ids, sorted(set(positions))))
    if cut:  # said, not silent: positions past the cut are never explained
        print(
            f"[verbalize] {len(cut)} text(s) cut to their first {max_tokens} tokens (e.g. {cut[0]}); "
            "raise --max_doc_tokens to read more",
            file=sys.stderr,
        )
    if not records:
        raise ConfigError(
            "no token positions to explain: the texts are too short for the position rule "
            "(lower --min_position, or pass --positions)."
        )
    predict = "next" in getattr(claims.trained_format(nla.meta.extra), "claim_types", ())  # its claims can be checked
    with nla.target_model() as model:
        vectors, next_ids = extract_vectors(model, records, nla.layer, batch_size, tok.pad_token_id, predict)
    rows = [
        {
            "doc_id": r.doc_id,
            "position": p,
            "token": tok.decode([r.ids[p]]),
            "context": tok.decode(r.ids[: p + 1], skip_special_tokens=True),
        }
        for r in records
        for p in r.positions
    ]
    if next_ids is not None:
        for row, t in zip(rows, next_ids.tolist()):
            row["next_token"] = tok.decode([t])
    return torch.from_numpy(vectors), rows


# ---------------------------------------------------------------- explain + score


def verbalize_rows(
    nla: NLA,
    vectors: torch.Tensor,
    num_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    rerank_with_ar: bool = False,
) -> list[dict[str, Any]]:
    """vectors [n, d] raw -> one dict per vector: explanation, failed, text, n_tokens, selection,
    and with an AR mse_nrm / fve_nrm (plus every candidate when num_samples > 1)."""
    if num_samples < 1:
        raise ConfigError("--num_samples must be >= 1.")
    if rerank_with_ar and nla.ar is None:
        raise ConfigError("--rerank_with_ar needs an AR: pass --checkpoint DIR holding ar/, or --ar_checkpoint DIR.")
    samples = nla.explain(vectors, num_samples, temperature, max_new_tokens)
    var, var_source = nla.variance(vectors) if nla.ar is not None else (None, "none")
    mse = None
    if nla.ar is not None:  # [n, k]: every candidate scored against its own vector
        flat = [s.explanation for group in samples for s in group]
        pred = nla.predict(flat)
        mse = mse_nrm(pred, vectors.float().repeat_interleave(num_samples, 0), nla.mse_scale).view(-1, num_samples)
    selection = f"best_of_{num_samples}_by_AR" if rerank_with_ar else ("greedy" if temperature == 0 else "first_sample")
    rows = []
    for i, group in enumerate(samples):
        pick = 0
        if rerank_with_ar:  # failed samples only win when every sample failed
            penalty = torch.tensor([float("inf") if s.failed else 0.0 for s in group])
            pick = (
                int(torch.argmin(mse[i] + penalty)) if not all(s.failed for s in group) else int(torch.argmin(mse[i]))
            )
        s = group[pick]
        row = {
            "explanation": s.explanation,
            "failed": s.failed,
            "text": s.text,
            "n_tokens": s.n_tokens,
            "selection": selection,
            "num_samples": num_samples,
            "temperature": temperature,
        }
        if mse is not None:
            row["mse_nrm"] = float(mse[i, pick])
            row["fve_nrm"] = None if var is None else fve_from_mse(row["mse_nrm"], var)
            row["var_source"] = var_source
        if num_samples > 1:
            row["candidates"] = [
                {
                    "explanation": c.explanation,
                    "failed": c.failed,
                    **({"mse_nrm": float(mse[i, j])} if mse is not None else {}),
                }
                for j, c in enumerate(group)
            ]
        rows.append(row)
    return rows


def _load(nla: NLA | None, checkpoint, av, ar, device: str, dtype: str, max_new_tokens: int, target_model) -> NLA:
    return nla or load_nla(
        checkpoint, av, ar, device=device, dtype=dtype, max_new_tokens=max_new_tokens, target_model=target_model
    )


def explain_vectors(
    vectors: torch.Tensor | np.ndarray,
    checkpoint: str | Path | None = None,
    *,
    nla: NLA | None = None,
    av: str | None = None,
    ar: str | None = None,
    num_samples: int = 1,
    rerank_with_ar: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    device: str = "auto",
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Raw activations [n, d] (or [d]) -> one row dict per vector (see `verbalize_rows`).

    Pass a loaded `nla` (from `nla.models.pair.load_nla`) to explain many batches without reloading.
    """
    nla = _load(nla, checkpoint, av, ar, device, dtype, max_new_tokens, None)
    vectors = torch.as_tensor(vectors, dtype=torch.float32)
    vectors = vectors.unsqueeze(0) if vectors.dim() == 1 else vectors
    if vectors.shape[-1] != nla.d_model:
        raise ConfigError(f"vectors have width {vectors.shape[-1]}, the AV explains d_model {nla.d_model}.")
    rows = verbalize_rows(nla, vectors, num_samples, temperature, max_new_tokens, rerank_with_ar)
    return [{"row": i, **r} for i, r in enumerate(rows)]


def explain_text(
    text: str,
    checkpoint: str | Path | None = None,
    *,
    positions: list[int] | None = None,
    nla: NLA | None = None,
    av: str | None = None,
    ar: str | None = None,
    num_samples: int = 1,
    rerank_with_ar: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    max_tokens: int = 256,
    target_model: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Explain `text` at `positions` (default: every non-special token) -> one row dict per position,
    with doc_id, position, token, context, explanation, failed and (with an AR) mse_nrm / fve_nrm."""
    nla = _load(nla, checkpoint, av, ar, device, dtype, max_new_tokens, target_model)
    vectors, info = extract_text_rows(nla, [{"text": text, "doc_id": "text", "positions": positions}], max_tokens)
    rows = verbalize_rows(nla, vectors, num_samples, temperature, max_new_tokens, rerank_with_ar)
    return [{**i, **r} for i, r in zip(info, rows)]


# ---------------------------------------------------------------- stage


def output_path(cfg: NLAConfig, args: VerbalizeArgs) -> Path:
    return Path(args.out) if args.out else cfg.output_dir / "verbalize" / "explanations.jsonl"


def run(cfg: NLAConfig, args: VerbalizeArgs | None = None, nla: NLA | None = None) -> dict[str, Any]:
    """Explain the requested input; write JSONL; return {rows, out, n, selection, fve_mean}."""
    args = args or VerbalizeArgs()
    given = [name for name in ("text", "texts", "vectors") if getattr(args, name) is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one input: --text, --texts or --vectors (got {given or 'none'}).")
    nla = nla or load_from_config(cfg, args.checkpoint, need_ar=args.rerank_with_ar, target_model=args.target_model)
    positions = parse_positions(args.positions)
    if args.vectors is not None:
        vectors, info = read_vectors(args.vectors, nla.d_model)
    else:
        docs = (
            [{"text": args.text, "doc_id": "text", "positions": positions}]
            if args.text is not None
            else [{**d, "positions": d["positions"] or positions} for d in read_texts(args.texts, cfg.data.text_field)]
        )
        vectors, info = extract_text_rows(nla, docs, cfg.data.max_doc_tokens, cfg.data.extract_batch_size)
    rows = verbalize_rows(
        nla, vectors, args.num_samples, args.verbalize_temperature, cfg.av.av_max_new_tokens, args.rerank_with_ar
    )
    rows = [{**i, **r} for i, r in zip(info, rows)]
    out = output_path(cfg, args)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if args.html:  # the same browsable table as eval's report.html, for these rows
        atomic_write_text(out.with_suffix(".html"), html_page(f"NLA verbalize: {out.name}", rows))
    fves = [r["fve_nrm"] for r in rows if r.get("fve_nrm") is not None]
    return {
        "rows": rows,
        "out": str(out),
        "n": len(rows),
        "selection": rows[0]["selection"] if rows else None,
        "fve_mean": sum(fves) / len(fves) if fves else None,
        "failed": sum(r["failed"] for r in rows),
    }


def format_table(rows: list[dict[str, Any]], width: int = 90) -> str:
    """pos | token | fve | explanation, one line per row."""
    lines = [f"{'doc:pos':>14}  {'token':<12} {'fve':>6}  explanation", "-" * (36 + width // 2)]
    for r in rows:
        where = f"{str(r.get('doc_id', ''))[-8:]}:{r.get('position', r.get('row', ''))}"
        fve = r.get("fve_nrm")
        expl = r["explanation"] if r["explanation"] is not None else f"<failed> {r['text'][:40]!r}"
        token = repr(r.get("token", ""))[1:-1][:12]
        lines.append(
            f"{where:>14}  {token:<12} {'' if fve is None else f'{fve:6.3f}':>6}  {expl.replace(chr(10), ' ')[:width]}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg, (args,) = start_stage(
        argv, "verbalize", extra=[VerbalizeArgs], folder=lambda c, ex: output_path(c, ex[0]).parent
    )
    summary = run(cfg, args)
    print(format_table(summary["rows"]))
    fve = summary["fve_mean"]
    print(
        f"[verbalize] {summary['n']} rows ({summary['selection']}, {summary['failed']} failed)"
        f"{'' if fve is None else f', mean fve_nrm {fve:.3f}'} -> {summary['out']}"
    )
    return 0
