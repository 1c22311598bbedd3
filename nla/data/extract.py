"""Activation extraction for `nla datagen`: positions, the marker, batched early-exit forwards.

- Positions: per document, up to `positions_per_doc` distinct token indices >= `min_position`,
  never on a special token, drawn by ONE RNG seeded with sha256(seed, doc_id) (Python's `hash`
  is salted per process, so it would change positions between runs).
- Marker: the first candidate that encodes to exactly one token, sits exactly once (with
  neighbours) in the canonical AV prompt, and never occurs in the corpus text seen. Candidates:
  CJK U+3200-U+33FF (reference practice), other symbol ranges, then unused special tokens.
- Extraction: documents are cut after their last chosen position (causal model: later tokens
  cannot change earlier states), sorted by length, right-padded with an attention mask, and run
  through `block_output` (stops after block K). Vectors are stored raw in fp32.
- Resume: documents are grouped into chunks of `CHUNK_DOCS`; each finished chunk is written
  atomically to `<data_dir>/.work/extract-<hash>.parquet`, the hash covering the model, layer,
  dtype, extraction settings and the chunk's doc ids and positions, so a rerun skips finished
  chunks and never reuses stale ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nla.core import templates
from nla.core.io import atomic_file
from nla.core.sidecar import SidecarError, TokenSpec, make_token_spec
from nla.core.tracking import progress
from nla.models.backbone import block_output, block_output_and_logits

CHUNK_DOCS = 64  # documents per resumable extraction chunk
MARKER_RANGES = ((0x3200, 0x33FF), (0x2190, 0x2BFF), (0x2000, 0x206F), (0x00A1, 0x00BF))


def stable_int(*parts: Any) -> int:
    """A 64-bit integer from sha256 of the parts; identical on every run, machine and process."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def stable_unit(*parts: Any) -> float:
    """A number in [0, 1) from sha256 of the parts."""
    return stable_int(*parts) / 2.0**64


# ---------------------------------------------------------------- positions


@dataclass
class DocRecord:
    """One tokenized document and the positions chosen in it."""

    doc_id: str
    ids: list[int]  # [n_tokens] after truncation to max_doc_tokens
    positions: list[int]  # sorted, each >= min_position


CHARS_PER_TOKEN_BOUND = 16  # we tokenize only a text prefix this many chars per kept token long


def tokenize_document(tokenizer, text: str, max_doc_tokens: int) -> list[int]:
    """Token ids as the tokenizer makes them (BOS only where it adds one), cut to max_doc_tokens.

    Only a prefix of the text is tokenized, so a huge document costs no more than a short one.
    """
    return document_tokens(tokenizer, text, max_doc_tokens)[0]


def document_tokens(tokenizer, text: str, max_doc_tokens: int) -> tuple[list[int], bool]:
    """`tokenize_document`'s ids, and whether the text had more than max_doc_tokens tokens (cut)."""
    prefix = text[: max_doc_tokens * CHARS_PER_TOKEN_BOUND]
    ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    return list(ids[:max_doc_tokens]), len(ids) > max_doc_tokens or len(prefix) < len(text)


def choose_positions(
    ids: list[int], special_ids: set[int], k: int, min_position: int, seed: int, doc_id: str
) -> list[int]:
    """Up to k distinct sorted indices >= min_position, not on special tokens; [] if none qualify."""
    eligible = [i for i in range(min_position, len(ids)) if ids[i] not in special_ids]
    if not eligible:
        return []
    rng = np.random.default_rng(stable_int("positions", seed, doc_id))
    picked = rng.choice(len(eligible), size=min(k, len(eligible)), replace=False)
    return sorted(eligible[i] for i in picked)


# ---------------------------------------------------------------- marker


def marker_candidates(tokenizer) -> Iterator[str]:
    """Symbol characters in scan order, then the tokenizer's special tokens not used as bos/eos/pad/unk."""
    for lo, hi in MARKER_RANGES:
        for code in range(lo, hi + 1):
            yield chr(code)
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    for token_id, added in sorted(tokenizer.added_tokens_decoder.items()):
        if getattr(added, "special", False) and token_id not in reserved:
            yield str(added.content)


def choose_marker(tokenizer, seen_chars: set[str], seen_ids: set[int]) -> TokenSpec:
    """The first usable marker absent from the corpus: neither its character nor its token id was seen.

    (A special token written in the text is tokenized to its id, so `seen_ids` covers those.)
    """
    try:
        templates.require_chat_template(tokenizer)
    except templates.NoChatTemplate as err:
        raise SidecarError(f"{err}.") from None
    for cand in marker_candidates(tokenizer):
        if len(cand) == 1 and cand in seen_chars:
            continue
        ids = tokenizer.encode(cand, add_special_tokens=False)
        if len(ids) != 1 or ids[0] in seen_ids:
            continue
        try:
            return make_token_spec(tokenizer, cand)
        except SidecarError:  # not exactly once in the AV prompt, or no neighbours
            continue
    raise SidecarError(
        "no marker found: every candidate symbol/special token is either split into several tokens, "
        "occurs in the corpus, or clashes with the AV prompt. Use a tokenizer with unused special tokens."
    )


# ---------------------------------------------------------------- extraction


@dataclass
class Rows:
    """Extracted rows in corpus order; `vectors` is [n_rows, d_model] float32 (raw)."""

    doc_id: list[str] = field(default_factory=list)
    position: list[int] = field(default_factory=list)
    n_raw_tokens: list[int] = field(default_factory=list)  # tokens in the context: position + 1
    context: list[str] = field(default_factory=list)  # decoded tokens [0, position]
    vectors: list[np.ndarray] = field(default_factory=list)  # one [rows_in_chunk, d] array per chunk
    next_token: list[str | None] = field(default_factory=list)  # the model's top-1 next token (predict_next), else None

    def extend(self, other: Rows) -> None:
        for name in ("doc_id", "position", "n_raw_tokens", "context", "vectors", "next_token"):
            getattr(self, name).extend(getattr(other, name))

    def matrix(self) -> np.ndarray:
        """[n_rows, d_model] float32."""
        return np.concatenate(self.vectors, axis=0) if self.vectors else np.zeros((0, 0), np.float32)

    def __len__(self) -> int:
        return len(self.doc_id)


@torch.inference_mode()
def extract_vectors(
    model, docs: list[DocRecord], layer: int, batch_size: int, pad_id: int, predict_next: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """-> ([sum of len(d.positions), d_model] float32: block-`layer` outputs at each doc's positions, in
    doc order; with `predict_next`, the model's most likely next token id at each of them, else None).
    The prediction needs the whole forward (the vectors alone stop at block `layer`)."""
    device = next(model.parameters()).device
    need = [max(d.positions) + 1 for d in docs]  # tokens after the last position cannot change it
    order = sorted(range(len(docs)), key=lambda i: -need[i])  # similar lengths share a batch: less padding
    per_doc: dict[int, np.ndarray] = {}
    per_doc_next: dict[int, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(need[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding keeps position ids = token index
            ids[row, : need[i]] = torch.tensor(docs[i].ids[: need[i]])
            mask[row, : need[i]] = 1
        if predict_next:
            hidden, logits = block_output_and_logits(model, ids.to(device), mask.to(device), layer)
        else:
            hidden, logits = block_output(model, ids.to(device), mask.to(device), layer), None  # [b, width, d]
        for row, i in enumerate(batch):
            per_doc[i] = hidden[row, docs[i].positions].float().cpu().numpy()
            if logits is not None:
                per_doc_next[i] = logits[row, docs[i].positions].argmax(-1).cpu().numpy()
    vectors = np.concatenate([per_doc[i] for i in range(len(docs))], axis=0)
    return vectors, (np.concatenate([per_doc_next[i] for i in range(len(docs))]) if predict_next else None)


@dataclass
class ScanResult:
    """Everything the extraction pass learned about the corpus."""

    rows: Rows
    n_docs: int = 0
    n_skipped_short: int = 0
    n_chunks_new: int = 0
    n_chunks_reused: int = 0
    extract_seconds: float = 0.0  # wall time of the forwards of new chunks
    rows_new: int = 0
    seen_chars: set[str] = field(default_factory=set)
    seen_ids: set[int] = field(default_factory=set)

    @property
    def activations_per_s(self) -> float | None:
        return self.rows_new / self.extract_seconds if self.extract_seconds > 0 else None


class ChunkStore:
    """Finished extraction chunks under `<data_dir>/.work/`, named by a hash of what made them."""

    def __init__(self, work_dir: Path, identity: dict[str, Any]):
        """`identity`: what made the chunks (model, layer, positions ...); with `"predict_next": True`
        the chunks also record the model's top-1 next token at each position (a whole forward)."""
        self.dir = Path(work_dir)
        self.identity = identity
        self.predict_next = bool(identity.get("predict_next"))

    def path(self, docs: list[DocRecord]) -> Path:
        key = stable_int(self.identity, [(d.doc_id, d.positions, len(d.ids)) for d in docs])
        return self.dir / f"extract-{key:016x}.parquet"

    def load(self, path: Path) -> Rows:
        table = pq.read_table(path)
        col = table.column("activation_vector").combine_chunks()
        vecs = np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), -1)
        nexts = table.column("next_token").to_pylist() if "next_token" in table.column_names else [None] * len(col)
        return Rows(
            table.column("doc_id").to_pylist(),
            table.column("position").to_pylist(),
            table.column("n_raw_tokens").to_pylist(),
            table.column("context").to_pylist(),
            [vecs],
            nexts,
        )

    def save(self, path: Path, rows: Rows) -> None:
        vecs = rows.matrix()
        flat = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), type=pa.float32()), vecs.shape[1])
        table = pa.table(
            {
                "doc_id": rows.doc_id,
                "position": rows.position,
                "n_raw_tokens": rows.n_raw_tokens,
                "context": rows.context,
                "activation_vector": flat,
                "next_token": pa.array(rows.next_token, type=pa.string()),
            }
        )
        with atomic_file(path) as tmp:  # a crash or full disk leaves no partial chunk behind
            pq.write_table(table, tmp)


def scan_and_extract(
    documents: Iterable,
    tokenizer,
    model,
    layer: int,
    store: ChunkStore,
    *,
    max_doc_tokens: int,
    positions_per_doc: int,
    min_position: int,
    seed: int,
    batch_size: int,
    total: int | None = None,
    show_progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> ScanResult:
    """Stream documents, choose positions, extract chunk by chunk (reusing finished chunks).

    `shard=(rank, world)`: this process computes only chunks with index % world == rank (other
    ranks' chunks are read from disk afterwards by the caller); every rank scans all the text.
    """
    special = set(tokenizer.all_special_ids)
    special_text = [(str(t.content), tid) for tid, t in tokenizer.added_tokens_decoder.items()]
    result = ScanResult(rows=Rows())
    pending: list[DocRecord] = []
    chunk_index = 0

    def flush() -> None:
        nonlocal chunk_index
        if pending:
            if chunk_index % shard[1] == shard[0]:
                result.rows.extend(_run_chunk(pending, tokenizer, model, layer, store, batch_size, result))
            chunk_index += 1
            pending.clear()

    for doc in progress(documents, enabled=show_progress, total=total, desc="datagen: extract", unit="doc"):
        result.n_docs += 1
        result.seen_chars.update(doc.text)
        ids = tokenize_document(tokenizer, doc.text, max_doc_tokens)
        result.seen_ids.update(ids)
        # the marker must not occur anywhere in the text, not only in the kept tokens
        result.seen_ids.update(tid for text, tid in special_text if text in doc.text)
        positions = choose_positions(ids, special, positions_per_doc, min_position, seed, doc.doc_id)
        if not positions:
            result.n_skipped_short += 1
            continue
        pending.append(DocRecord(doc.doc_id, ids, positions))
        if len(pending) >= CHUNK_DOCS:
            flush()
    flush()
    return result


def _run_chunk(
    docs: list[DocRecord], tokenizer, model, layer: int, store: ChunkStore, batch_size: int, result: ScanResult
) -> Rows:
    path = store.path(docs)
    if path.is_file():
        result.n_chunks_reused += 1
        return store.load(path)
    start = time.perf_counter()
    vectors, next_ids = extract_vectors(model, docs, layer, batch_size, tokenizer.pad_token_id, store.predict_next)
    rows = Rows(vectors=[vectors])
    for d in docs:
        for p in d.positions:
            rows.doc_id.append(d.doc_id)
            rows.position.append(p)
            rows.n_raw_tokens.append(p + 1)
            rows.context.append(tokenizer.decode(d.ids[: p + 1], skip_special_tokens=True))
    rows.next_token = (
        [tokenizer.decode([int(t)]) for t in next_ids] if next_ids is not None else [None] * len(rows.doc_id)
    )
    store.save(path, rows)
    result.extract_seconds += time.perf_counter() - start
    result.rows_new += len(rows)
    result.n_chunks_new += 1
    return rows


def norm_stats(vectors: np.ndarray) -> dict[str, float]:
    """Percentiles and mean of the row norms of [n, d] vectors (over ALL extracted rows)."""
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    p50, p75, p95 = np.percentile(norms, [50, 75, 95])
    return {"p50": float(p50), "p75": float(p75), "p95": float(p95), "mean": float(norms.mean())}
