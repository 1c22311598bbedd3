"""Dataset splits on disk: `<data_dir>/<split>.parquet` + `<split>.parquet.nla_meta.yaml`.

Columns (reference names): `doc_id`, `position`, `n_raw_tokens`, `activation_layer`,
`activation_vector` (list<float32>, raw, never normalised), `detokenized_text_truncated`
(context up to the position), `explanation` (teacher text; null for RL rows), `prompt` (AV user
message, or the filled AR prompt in ar_sft), `response` (AV target, av_sft/val/test).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nla.core import templates
from nla.core.config import ConfigError
from nla.core.io import atomic_file
from nla.core.sidecar import Meta, dataset_meta_path, read_meta, write_meta

SPLITS = ("av_sft", "ar_sft", "rl", "val", "test")
TEACHER_SPLITS = ("av_sft", "ar_sft", "val", "test")  # rows that need an explanation
RESPONSE_SPLITS = ("av_sft", "val", "test")  # rows that carry the AV's target text


@dataclass
class Split:
    vectors: torch.Tensor  # [n, d] float32, raw activations
    columns: dict[str, list[Any]]  # every other column, as python lists
    meta: Meta
    path: Path
    dropped_nonfinite: int = 0  # rows whose vector held NaN/inf, left out on load

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def column(self, name: str) -> list[Any]:
        if name not in self.columns:
            raise KeyError(f"{self.path} has no column {name!r} (columns: {sorted(self.columns)}).")
        return self.columns[name]


def derangement(n: int, seed: int) -> torch.Tensor:
    """[n] permutation with no fixed point (n >= 2): a cyclic shift over a random order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def split_path(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / f"{name}.parquet"


def write_split(
    path: str | Path, vectors: np.ndarray | torch.Tensor, columns: dict[str, list[Any]], meta: Meta
) -> Path:
    """Write parquet then sidecar, each atomically; `meta.extra['row_count']` is set here."""
    path = Path(path)
    vecs = (
        vectors.detach().cpu().float().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors, np.float32)
    )
    n, d = vecs.shape if vecs.size else (0, meta.d_model)
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} rows, vectors have {n}.")
    flat = pa.array(vecs.reshape(-1), type=pa.float32())
    table = pa.table({**columns, "activation_vector": pa.FixedSizeListArray.from_arrays(flat, d)})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    meta.extra["row_count"] = n
    write_meta(dataset_meta_path(path), meta)
    return path


def spread_rows(doc_ids: list[Any], limit: int, seed: int = 0) -> list[int]:
    """At most `limit` row indices drawn across documents, in file order: documents in a seeded
    order, one row from each in turn. (The first N rows of a split come from a handful of
    documents - 32 rows were 4 documents - so a capped eval would measure those documents only.)"""
    if limit >= len(doc_ids):
        return list(range(len(doc_ids)))
    by_doc: dict[Any, list[int]] = {}
    for i, d in enumerate(doc_ids):
        by_doc.setdefault(d, []).append(i)
    groups = list(by_doc.values())
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    picked: list[int] = []
    for turn in range(max(len(g) for g in groups)):
        for j in order:
            if turn < len(groups[j]) and len(picked) < limit:
                picked.append(groups[j][turn])
    return sorted(picked)


def split_columns(
    name: str, rows, idx: list[int], layer: int, explanation: list[str | None], av_message: str
) -> dict[str, list[Any]]:
    """The column layout of split `name` for `rows` (datagen's, indexed by `idx`): the reference
    release's columns, the model's next token where it was recorded, the prompt each model reads,
    and on the AV's splits its target text."""
    columns: dict[str, list[Any]] = {
        "doc_id": [rows.doc_id[i] for i in idx],
        "position": [rows.position[i] for i in idx],
        "n_raw_tokens": [rows.n_raw_tokens[i] for i in idx],
        "activation_layer": [layer] * len(idx),
        "detokenized_text_truncated": [rows.context[i] for i in idx],
    }
    if any(t is not None for t in rows.next_token):
        columns["model_next_token"] = [rows.next_token[i] for i in idx]
    columns["explanation"] = [explanation[i] for i in idx]
    columns["prompt"] = [templates.ar_prompt(explanation[i]) if name == "ar_sft" else av_message for i in idx]
    if name in RESPONSE_SPLITS:
        columns["response"] = [templates.av_response(explanation[i]) for i in idx]
    return columns


def load_split(path: str | Path, max_rows: int | None = None, seed: int = 0) -> Split:
    """A split; with `max_rows`, at most that many rows spread across its documents (`spread_rows`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run `nla datagen` first (or point --data_dir at its output).")
    meta = read_meta(dataset_meta_path(path))
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ConfigError(
            f"{path} is not a readable parquet file ({str(err).splitlines()[0]}); rerun `nla datagen` to rewrite it."
        ) from None
    if max_rows is not None and table.num_rows > max_rows:
        doc_ids = table.column("doc_id").to_pylist() if "doc_id" in table.column_names else list(range(table.num_rows))
        table = table.take(spread_rows(doc_ids, max_rows, seed))
    col = table.column("activation_vector").combine_chunks()
    d = meta.d_model or (len(col[0]) if len(col) else 0)
    values = np.asarray(col.flatten() if hasattr(col, "flatten") else col.values, dtype=np.float32)
    vectors = torch.from_numpy(values.reshape(len(col), d if not len(col) else -1).copy())  # an empty split is [0, d]
    if len(col) and vectors.shape[1] != d:
        raise ConfigError(
            f"{path}: vectors have width {vectors.shape[1]} but its sidecar says d_model={d}; the two files do "
            "not belong together: rerun `nla datagen`."
        )
    columns = {name: table.column(name).to_pylist() for name in table.column_names if name != "activation_vector"}
    finite = torch.isfinite(vectors).all(dim=1)
    dropped = int((~finite).sum())
    if dropped:  # every stage reads splits here, so NaN/inf rows are dropped (and said) the same way everywhere
        print(
            f"[data] {path}: left out {dropped} of {len(finite)} rows whose activation holds NaN/inf", file=sys.stderr
        )
        keep = finite.nonzero().squeeze(1).tolist()
        vectors = vectors[finite]
        columns = {name: [values[i] for i in keep] for name, values in columns.items()}
    return Split(vectors, columns, meta, path, dropped)
