"""Corpora as streams of documents with stable ids (never a whole large corpus in memory).

Specs:
  builtin:python-docs   the Python Language Reference text shipped with CPython (`pydoc_data`,
                        PSF licence): real English prose on every machine, no download.
  builtin:python-stdlib the docstrings of the Python standard library's own modules (read with
                        `ast`, never imported; PSF licence): several MB of English prose about code.
  builtin:python        both of the above, ordered by a stable hash of the document id, so any
                        `max_docs` prefix samples both sources and every topic.
  PATH.txt | .jsonl | .parquet, or a folder of them (sorted, recursive).
  hf:NAME[:CONFIG]:SPLIT   a Hugging Face dataset, streamed (needs allow_hub).

Document ids are derived from the source and position only, so they are the same on every run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUILTIN = "builtin:python-docs"
BUILTIN_STDLIB = "builtin:python-stdlib"
BUILTIN_ALL = "builtin:python"
BUILTINS = (BUILTIN, BUILTIN_STDLIB, BUILTIN_ALL)
# parts of the standard library that are tests, vendored code or tooling, not library prose
STDLIB_SKIP = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "ensurepip",
    "turtledemo",
    "__pycache__",
    "pydoc_data",
    "venv",
    "config-3",
}
CHUNK_CHARS = 1500  # builtin/.txt documents are paragraphs packed up to about this many characters
SUFFIXES = (".txt", ".jsonl", ".parquet")


class CorpusError(ValueError):
    """The corpus spec or its files are unusable; the message says how to fix it."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def iter_documents(
    spec: str, text_field: str = "text", max_docs: int | None = None, allow_hub: bool = False
) -> Iterator[Document]:
    """Stream documents (empty texts skipped) from `spec`, at most `max_docs`."""
    count = 0
    for doc in _source(spec, text_field, allow_hub):
        if not doc.text.strip():
            continue
        yield doc
        count += 1
        if max_docs is not None and count >= max_docs:
            return


def _source(spec: str, text_field: str, allow_hub: bool) -> Iterator[Document]:
    if spec == BUILTIN:
        yield from _builtin_python_docs()
        return
    if spec == BUILTIN_STDLIB:
        yield from _builtin_stdlib_docstrings()
        return
    if spec == BUILTIN_ALL:
        docs = [*_builtin_python_docs(), *_builtin_stdlib_docstrings()]
        yield from sorted(docs, key=lambda d: hashlib.sha256(d.doc_id.encode("utf-8")).digest())
        return
    if spec.startswith("builtin:"):
        raise CorpusError(f"unknown builtin corpus {spec!r}; use one of {', '.join(BUILTINS)}.")
    if spec.startswith("hf:"):
        yield from _hf_dataset(spec, text_field, allow_hub)
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise CorpusError(f"{path} holds no {'/'.join(SUFFIXES)} files.")
        for f in files:
            yield from _file(f, text_field, prefix=str(f.relative_to(path)))
        return
    if not path.exists():
        raise CorpusError(
            f"corpus {spec!r} not found: use {BUILTIN!r}, a .txt/.jsonl/.parquet file or folder, or hf:NAME:SPLIT."
        )
    yield from _file(path, text_field, prefix=path.name)


def _file(path: Path, text_field: str, prefix: str) -> Iterator[Document]:
    if path.suffix == ".txt":
        try:
            with open(path, encoding="utf-8") as fh:  # strict: binary junk would train as U+FFFD
                for i, chunk in enumerate(pack_paragraphs(fh)):
                    yield Document(f"{prefix}:{i}", chunk)
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"{path}: not UTF-8 text (byte {err.start}); convert it to UTF-8 or leave it out."
            ) from None
    elif path.suffix == ".jsonl":
        with open(path, "rb") as fh:
            for line_no, raw in enumerate(fh):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise CorpusError(f"{path}:{line_no + 1}: not UTF-8; convert the file to UTF-8.") from None
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{path}:{line_no + 1}: not valid JSON ({err.msg}).") from None
                if not isinstance(row, dict):
                    raise CorpusError(
                        f"{path}:{line_no + 1}: a JSON {type(row).__name__}, not an object "
                        f'{{"{text_field}": ...}}; write one object per line.'
                    )
                if text_field not in row:
                    raise CorpusError(
                        f"{path}:{line_no + 1}: no {text_field!r} key; set --text_field to the key holding the text."
                    )
                yield Document(str(row.get("id", row.get("doc_id", f"{prefix}:{line_no}"))), str(row[text_field]))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise CorpusError(f"{path}: no column {text_field!r} (columns: {names}); set --text_field.")
        id_col = next((c for c in ("id", "doc_id") if c in names), None)
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=[text_field] + ([id_col] if id_col else [])):
            cols = batch.to_pydict()
            for j, text in enumerate(cols[text_field]):
                doc_id = str(cols[id_col][j]) if id_col else f"{prefix}:{row}"
                yield Document(doc_id, text or "")
                row += 1
    else:
        raise CorpusError(f"{path}: unsupported corpus file type {path.suffix!r}; use .txt, .jsonl or .parquet.")


def pack_paragraphs(lines, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Group blank-line-separated paragraphs into chunks of about `chunk_chars` characters."""
    chunk: list[str] = []
    para: list[str] = []
    size = 0

    def flush_para():
        nonlocal size
        if para:
            text = "".join(para).strip("\n")
            if text.strip():
                chunk.append(text)
                size += len(text)
            para.clear()

    for line in lines:
        if line.strip():
            para.append(line)
            continue
        flush_para()
        if size >= chunk_chars:
            yield "\n\n".join(chunk)
            chunk.clear()
            size = 0
    flush_para()
    if chunk:
        yield "\n\n".join(chunk)


def _builtin_python_docs() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        for i, chunk in enumerate(pack_paragraphs(topics[key].splitlines(keepends=True))):
            yield Document(f"pydoc/{key}/{i}", chunk)


def module_docstrings(source: str) -> list[str]:
    """The docstrings of a module's source, in file order: module, classes, functions, methods.

    Parsed with `ast` (nothing is imported or run); unparsable files give []."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc.split()) >= 8:  # one-liners ("Return x.") carry little prose
            out.append(doc)
    return out


def _builtin_stdlib_docstrings() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("test_")
    )
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs = module_docstrings(source)
        if not docs:
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        lines = "\n\n".join(docs).splitlines(keepends=True)
        for i, chunk in enumerate(pack_paragraphs(lines)):
            yield Document(f"stdlib/{module}/{i}", chunk)


def _hf_dataset(spec: str, text_field: str, allow_hub: bool) -> Iterator[Document]:
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise CorpusError(f"{spec!r}: use hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT.")
    if not allow_hub:
        raise CorpusError(f"{spec!r} needs the Hugging Face hub: add --allow_hub true (or use a local file).")
    from datasets import load_dataset

    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    stream = load_dataset(name, config, split=split, streaming=True)
    for i, row in enumerate(stream):
        if text_field not in row:
            raise CorpusError(f"{spec}: rows have no {text_field!r} field (fields: {list(row)}); set --text_field.")
        yield Document(str(row.get("id", f"{name}:{split}:{i}")), str(row[text_field]))
