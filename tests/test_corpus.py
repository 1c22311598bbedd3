import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla.data.corpus import BUILTIN, CorpusError, iter_documents, pack_paragraphs


def test_builtin_corpus_is_real_english_with_stable_ids():
    first = list(iter_documents(BUILTIN, max_docs=50))
    again = list(iter_documents(BUILTIN, max_docs=50))
    assert [d.doc_id for d in first] == [d.doc_id for d in again]
    assert len({d.doc_id for d in first}) == 50
    text = " ".join(d.text for d in first)
    assert " the " in text and len(text) > 20_000
    everything = list(iter_documents(BUILTIN))
    assert len(everything) > 200  # enough documents for splits


def test_txt_jsonl_parquet_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond one.\n")
    rows = [{"id": "x1", "text": "hello there"}, {"text": "no id here"}, {"text": ""}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"text": ["p0", "p1"]}), tmp_path / "c.parquet")

    txt = list(iter_documents(str(tmp_path / "a.txt")))
    assert [d.doc_id for d in txt] == ["a.txt:0"] and "Second one." in txt[0].text
    jl = list(iter_documents(str(tmp_path / "b.jsonl")))
    assert [(d.doc_id, d.text) for d in jl] == [("x1", "hello there"), ("b.jsonl:1", "no id here")]  # empty skipped
    pqd = list(iter_documents(str(tmp_path / "c.parquet")))
    assert [(d.doc_id, d.text) for d in pqd] == [("c.parquet:0", "p0"), ("c.parquet:1", "p1")]
    folder = list(iter_documents(str(tmp_path)))
    assert [d.doc_id for d in folder] == ["a.txt:0", "x1", "b.jsonl:1", "c.parquet:0", "c.parquet:1"]
    assert [d.doc_id for d in iter_documents(str(tmp_path), max_docs=2)] == ["a.txt:0", "x1"]


def test_bad_corpus_errors_say_what_to_do(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="--text_field"):
        list(iter_documents(str(tmp_path / "b.jsonl")))
    with pytest.raises(CorpusError, match="--allow_hub"):
        list(iter_documents("hf:wikitext:wikitext-2-raw-v1:train"))


def test_pack_paragraphs_packs_to_size():
    lines = [("word " * 40 + "\n"), "\n"] * 30  # 30 paragraphs of ~200 chars
    chunks = list(pack_paragraphs(lines, chunk_chars=1000))
    assert len(chunks) == 6 and all(c.count("word") == 200 for c in chunks)


def test_stdlib_docstrings_are_read_without_importing_and_ids_are_stable():
    from nla.data.corpus import BUILTIN_ALL, BUILTIN_STDLIB, module_docstrings

    source = (
        '"""A module docstring long enough to be kept as prose here."""\n'
        'def f():\n    """Short."""\n'
        'class C:\n    """A class that does several things, described in enough words."""\n'
        '    def m(self):\n        """A method docstring with more than eight words in it."""\n'
        'raise SystemExit("never run: the file is parsed, not imported")\n'
    )
    assert module_docstrings(source) == [
        "A module docstring long enough to be kept as prose here.",
        "A class that does several things, described in enough words.",
        "A method docstring with more than eight words in it.",
    ]
    assert module_docstrings("def broken(:\n") == []
    first = [d.doc_id for d in iter_documents(BUILTIN_STDLIB, max_docs=30)]
    assert first == [d.doc_id for d in iter_documents(BUILTIN_STDLIB, max_docs=30)]
    assert all(i.startswith("stdlib/") for i in first) and len(set(first)) == 30
    mixed = list(iter_documents(BUILTIN_ALL))
    ids = [d.doc_id for d in mixed]
    assert len(ids) == len(set(ids)) > 1000  # both sources, no id twice
    head = ids[:200]  # a hash order: any prefix samples both sources
    assert any(i.startswith("pydoc/") for i in head) and any(i.startswith("stdlib/") for i in head)
    assert ids == [d.doc_id for d in iter_documents(BUILTIN_ALL)]


def test_unknown_builtin_corpus_is_refused():
    with pytest.raises(CorpusError, match="unknown builtin corpus"):
        list(iter_documents("builtin:nope"))
