"""Paired rows for a cross-model NLA: model B's activation at the same place in the same text.

`nla datagen --paired_model B [--paired_layer K_B]` extracts model A's rows as usual, then for each
row finds its partner in B's tokenization of the same document (nla/data/align.py: the B token
whose character span ends where the row's token ends) and B's block-K_B output there. Rows without
a partner are dropped from both datasets and counted. B's rows are written as a dataset of their
own under `<data_dir>/paired/` — same splits, same rows in the same order, the same explanations;
B's vectors, positions, contexts and marker — so every stage that reads a dataset reads it as
B's (B's own AV and AR, its context oracle, its token lookup), and the cross pair (A's AV, B's AR)
reads the two folders row by row. Both sidecars record `paired`: both models and layers, the
alignment rule and the counts. B's extraction goes through the same resumable chunks as A's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nla.core.sidecar import SidecarError, TokenSpec, dataset_meta_path, read_meta
from nla.data.align import RULE, align_positions, token_ends
from nla.data.extract import CHUNK_DOCS, ChunkStore, DocRecord, Rows, ScanResult, _run_chunk, choose_marker
from nla.models.backbone import default_layer, layer_problem, text_config

PAIRED_DIR = "paired"


def paired_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / PAIRED_DIR


@dataclass
class Paired:
    """B's side of the aligned rows: `keep` are A's row indices that have a partner (in order); the
    other fields are B's, one per kept row."""

    keep: list[int]
    rows: Rows  # B's doc_id, position (B's token index), n_raw_tokens, context (B's decoding), vectors
    spec: TokenSpec  # B's marker (for B's own AV)
    layer: int
    model: str
    positions: int  # A's rows looked at
    seconds: float

    def record(self, model_a: str, layer_a: int) -> dict[str, Any]:
        """What both sidecars say about the pairing."""
        return {
            "model_a": model_a,
            "layer_a": layer_a,
            "model_b": self.model,
            "layer_b": self.layer,
            "rule": RULE,
            "positions": self.positions,
            "aligned": len(self.keep),
            "dropped_unaligned": self.positions - len(self.keep),
        }


def resolve_paired_layer(model_b: str, layer: int | None, n_layers: int) -> int:
    layer = default_layer(n_layers) if layer is None else layer
    problem = layer_problem(layer, n_layers)
    if problem:
        raise SidecarError(f"--paired_model {model_b}: {problem}; pass --paired_layer in range.")
    return layer


def extract_paired(
    rows: Rows,
    texts: dict[str, str],
    tok_a,
    tok_b,
    model_b,
    model_b_name: str,
    layer_b: int | None,
    work: Path,
    identity: dict[str, Any],
    max_doc_tokens: int,
    batch_size: int,
    seen_chars: set[str],
) -> Paired:
    """B's rows for A's `rows` (`texts`: each document's text by doc_id). B reads up to twice A's
    token budget of each document, so a B that splits finer still reaches A's positions."""
    from nla.data.extract import document_tokens

    began = time.perf_counter()
    layer_b = resolve_paired_layer(model_b_name, layer_b, text_config(model_b.config).num_hidden_layers)
    by_doc: dict[str, list[int]] = {}
    for i, d in enumerate(rows.doc_id):
        by_doc.setdefault(d, []).append(i)
    seen_ids: set[int] = set()
    docs: list[DocRecord] = []
    keep: list[int] = []
    for doc_id, idx in by_doc.items():
        text = texts[doc_id]
        ids_a, _ = document_tokens(tok_a, text, max_doc_tokens)
        ids_b, _ = document_tokens(tok_b, text, 2 * max_doc_tokens)
        seen_ids.update(ids_b)
        partner = align_positions(
            token_ends(tok_a, text, len(ids_a)), token_ends(tok_b, text, len(ids_b)), [rows.position[i] for i in idx]
        )
        kept = [(i, q) for i, q in zip(idx, partner) if q is not None]
        if kept:
            docs.append(DocRecord(doc_id, ids_b, [q for _, q in kept]))
            keep += [i for i, _ in kept]
    if keep != sorted(keep):
        raise AssertionError("datagen's rows must come grouped by document, in corpus order")
    store = ChunkStore(work, {**identity, "paired_model": model_b_name, "paired_layer": layer_b, "rule": RULE})
    scan = ScanResult(rows=Rows())
    b = Rows()
    for start in range(0, len(docs), CHUNK_DOCS):
        b.extend(_run_chunk(docs[start : start + CHUNK_DOCS], tok_b, model_b, layer_b, store, batch_size, scan))
    special_text = [(str(t.content), tid) for tid, t in tok_b.added_tokens_decoder.items()]
    seen_ids.update(tid for text, tid in special_text if any(text in t for t in texts.values()))
    spec = choose_marker(tok_b, seen_chars, seen_ids)
    return Paired(keep, b, spec, layer_b, model_b_name, len(rows), time.perf_counter() - began)


def subset(rows: Rows, keep: list[int]) -> Rows:
    """The rows at `keep`, in that order, with one vector matrix."""
    vectors = rows.matrix()[keep]
    return Rows(
        [rows.doc_id[i] for i in keep],
        [rows.position[i] for i in keep],
        [rows.n_raw_tokens[i] for i in keep],
        [rows.context[i] for i in keep],
        [vectors],
        [rows.next_token[i] for i in keep],
    )


def paired_split(path_a: str | Path) -> Path:
    """B's split that pairs with A's split at `path_a`."""
    path_a = Path(path_a)
    return paired_dir(path_a.parent) / path_a.name


def check_paired(path_b: Path, model_b: str | None = None, layer_b: int | None = None) -> dict[str, Any]:
    """B's split's `paired` record; a one-line SidecarError when the split is not paired data, or
    holds another model's or layer's activations than the ones asked for."""
    meta_path = dataset_meta_path(path_b)
    if not meta_path.is_file():
        raise SidecarError(
            f"{path_b} not found: the cross-model AR reads paired data; run `nla datagen --paired_model B` first."
        )
    meta = read_meta(meta_path)
    record = meta.extra.get("paired")
    if not record:
        raise SidecarError(f"{meta_path}: not paired data (no 'paired' record); rerun `nla datagen --paired_model B`.")
    if model_b is not None and record["model_b"] != model_b:
        raise SidecarError(
            f"{path_b} holds activations of {record['model_b']!r}, not of {model_b!r}; pass --ar_model "
            f"{record['model_b']} or regenerate the data with --paired_model {model_b}."
        )
    if layer_b is not None and record["layer_b"] != layer_b:
        raise SidecarError(
            f"{path_b} holds block {record['layer_b']} of {record['model_b']}, not block {layer_b}; drop "
            "--ar_layer or regenerate the data with that --paired_layer."
        )
    return record


def same_rows(a, b) -> bool:
    """Whether two loaded splits (A's and B's) hold the same rows in the same order."""
    return a.columns.get("doc_id") == b.columns.get("doc_id") and a.columns.get("explanation") == b.columns.get(
        "explanation"
    )
