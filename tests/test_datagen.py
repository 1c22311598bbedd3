"""nla datagen on the tiny model: extraction parity, positions, marker, splits, sidecars, resume, errors."""

import errno
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from nla.core.config import parse_config
from nla.core.io import describe_os_error
from nla.core.sidecar import SidecarError, dataset_meta_path, read_meta
from nla.data.corpus import BUILTIN, iter_documents
from nla.data.extract import choose_marker, choose_positions
from nla.data.splits import SPLITS, load_split, split_path
from nla.data.teacher import ExtractiveTeacher
from nla.stages.datagen import DatagenError, run, split_of
from nla.testing import build_tiny_tokenizer

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def smoke_cfg(model_dir, out, *extra):
    cfg, _ = parse_config(
        ["--config", SMOKE, "--model", str(model_dir), "--output_dir", str(out), "--teacher", "extractive", *extra]
    )
    return cfg


def all_rows(data_dir):
    """(split, doc_id, position, vector) for every written row."""
    out = []
    for name in SPLITS:
        split = load_split(split_path(data_dir, name))
        out += [(name, d, p, v) for d, p, v in zip(split.column("doc_id"), split.column("position"), split.vectors)]
    return out


@pytest.fixture(scope="module")
def smoke_run(tiny_model_dir, tmp_path_factory):
    cfg = smoke_cfg(tiny_model_dir, tmp_path_factory.mktemp("dg"))
    return cfg, run(cfg)


def test_extraction_equals_hidden_states(smoke_run, tiny_model, tiny_tokenizer):
    cfg, out = smoke_run
    texts = {d.doc_id: d.text for d in iter_documents(BUILTIN, max_docs=cfg.data.max_docs)}
    rows = all_rows(cfg.data_dir)
    assert len(rows) == sum(out["rows"].values()) > 20
    for _, doc_id, pos, vec in rows[::5]:
        ids = tiny_tokenizer(texts[doc_id])["input_ids"][: cfg.data.max_doc_tokens]
        with torch.no_grad():  # unbatched, unpadded, full document: the reference
            ref = tiny_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[cfg.model.layer + 1][0, pos]
        assert torch.allclose(vec, ref, atol=1e-5), (doc_id, pos)
    control = rows[0][3]
    assert not torch.allclose(rows[1][3], control, atol=1e-3)  # vectors differ between rows


def test_positions_deterministic_per_seed():
    ids = list(range(100))
    a = choose_positions(ids, set(), 4, 50, 0, "doc")
    assert a == choose_positions(ids, set(), 4, 50, 0, "doc") and len(set(a)) == 4 and min(a) >= 50
    assert a != choose_positions(ids, set(), 4, 50, 1, "doc")
    assert a != choose_positions(ids, set(), 4, 50, 0, "other-doc")
    special = set(range(50, 98))  # only indices 98 and 99 are allowed
    assert choose_positions(ids, special, 4, 50, 0, "doc") == [98, 99]
    assert choose_positions(ids[:50], set(), 4, 50, 0, "doc") == []  # too short: skipped


def test_positions_same_across_runs_and_differ_by_seed(smoke_run, tiny_model_dir, tmp_path):
    cfg, _ = smoke_run
    first = {(d, p) for _, d, p, _ in all_rows(cfg.data_dir)}
    assert all(p >= cfg.data.min_position for _, p in first)
    run(again := smoke_cfg(tiny_model_dir, tmp_path / "again"))
    assert {(d, p) for _, d, p, _ in all_rows(again.data_dir)} == first
    run(other := smoke_cfg(tiny_model_dir, tmp_path / "seed1", "--seed", "1"))
    assert {(d, p) for _, d, p, _ in all_rows(other.data_dir)} != first


def test_splits_disjoint_by_document_and_stable(smoke_run):
    cfg, out = smoke_run
    docs = {name: set() for name in SPLITS}
    for name, doc_id, _, _ in all_rows(cfg.data_dir):
        docs[name].add(doc_id)
        assert split_of(cfg.run.seed, doc_id, cfg.data.split_weights) == name
    names = list(docs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not docs[a] & docs[b], (a, b)
    counts = {n: 0 for n in SPLITS}
    for i in range(4000):
        counts[split_of(0, f"d{i}", [0.25, 0.25, 0.4, 0.05, 0.05])] += 1
    assert 900 < counts["av_sft"] < 1100 and 1450 < counts["rl"] < 1750 and 130 < counts["test"] < 280


def test_columns_and_sidecar_round_trip(smoke_run, tiny_tokenizer):
    cfg, out = smoke_run
    av, ar, rl = (load_split(split_path(cfg.data_dir, n)) for n in ("av_sft", "ar_sft", "rl"))
    marker = out["marker"]
    assert all(marker in p and "<concept>" in p for p in av.column("prompt"))
    assert all(
        r.startswith("<explanation>\n") and e in r for r, e in zip(av.column("response"), av.column("explanation"))
    )
    assert all(
        p.startswith("Summary of the following text: <text>") and e in p
        for p, e in zip(ar.column("prompt"), ar.column("explanation"))
    )
    assert set(rl.column("explanation")) == {None} and "response" not in rl.columns
    assert all(n == p + 1 for n, p in zip(av.column("n_raw_tokens"), av.column("position")))
    meta = read_meta(dataset_meta_path(split_path(cfg.data_dir, "av_sft")))
    assert meta.kind == "nla_dataset" and meta.d_model == 64 and meta.layer_index == 1
    assert meta.extra["stage"] == "av_sft" and meta.extra["row_count"] == len(av)
    assert meta.extra["suggested_injection_scale"] == pytest.approx(out["norms"]["p75"])
    assert meta.extra["extraction"]["positions_per_doc"] == 2 and meta.extra["teacher"]["provider"] == "extractive"
    assert meta.extra["dataset_id"] == rl.meta.extra["dataset_id"]
    meta.verify(tiny_tokenizer, d_model=64)
    with pytest.raises(SidecarError, match="different tokenizer|another tokenizer"):
        meta.verify(build_tiny_tokenizer(vocab_size=400))  # different vocab: the marker has another id
    summary = json.loads((cfg.data_dir / "datagen_summary.json").read_text())
    assert summary["rows"] == out["rows"] and summary["docs"] == cfg.data.max_docs and summary["teacher_malformed"] == 0
    norms = torch.linalg.norm(torch.stack([v for *_, v in all_rows(cfg.data_dir)]), dim=1)
    assert out["norms"]["p50"] == pytest.approx(norms.median().item(), rel=0.05)
    assert len(out["samples"]) == 3 and all(e for _, e in out["samples"])


def test_marker_avoids_corpus_characters(tiny_tokenizer, tiny_model_dir, tmp_path):
    assert choose_marker(tiny_tokenizer, set(), set()).injection_char == "㈠"
    assert choose_marker(tiny_tokenizer, {"㈠"}, set()).injection_char == "㈡"
    every_char = {chr(c) for lo, hi in [(0xA1, 0x2BFF), (0x3200, 0x33FF)] for c in range(lo, hi + 1)}
    fallback = choose_marker(tiny_tokenizer, every_char, set())  # no symbol left: an unused special token
    assert fallback.injection_char == "<|endoftext|>"
    docs = [{"text": f"Paragraph {i} mentions ㈠ once and then goes on about tuples and lists. " * 3} for i in range(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs))
    # six documents reach too few splits
    out = run(
        smoke_cfg(
            tiny_model_dir, tmp_path / "run", "--corpus", str(tmp_path / "c.jsonl"), "--split_fractions", "1,0,0,0,0"
        )
    )
    assert out["marker"] in "㈡㈢" and sum(out["rows"].values()) > 0


class FlakyTeacher(ExtractiveTeacher):
    """The real extractive teacher, counting contexts and raising after `fail_after` batches."""

    def __init__(self, fail_after=None):
        super().__init__(batch_size=4)
        self.fail_after, self.batches, self.calls = fail_after, 0, 0

    def complete(self, contexts):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("teacher crashed")
        self.batches += 1
        self.calls += len(contexts)
        return super().complete(contexts)


def test_rerun_after_crash_repeats_no_teacher_call(tiny_model_dir, tmp_path, smoke_run):
    cfg = smoke_cfg(tiny_model_dir, tmp_path)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        run(cfg, teacher=FlakyTeacher(fail_after=2))
    cache = (cfg.data_dir / ".work" / "teacher_cache.jsonl").read_text().splitlines()
    assert len(cache) == 8 and list((cfg.data_dir / ".work").glob("extract-*.parquet"))
    assert not list(cfg.data_dir.glob("*.parquet"))  # nothing half-done was published
    second = FlakyTeacher()
    out = run(cfg, teacher=second)
    summary = json.loads((cfg.data_dir / "datagen_summary.json").read_text())
    assert second.calls == summary["teacher_requested"] - 8 > 0
    assert summary["chunks_reused"] == 1 and summary["chunks_new"] == 0
    assert out["rows"] == smoke_run[1]["rows"]  # same data as an uninterrupted run
    third = FlakyTeacher()
    run(cfg, teacher=third)
    assert third.calls == 0


def test_disk_full_keeps_chunks_and_leaves_no_partial_file(tiny_model_dir, tmp_path, monkeypatch):
    cfg = smoke_cfg(tiny_model_dir, tmp_path)
    real_write = pq.write_table

    def full_disk(table, where, *a, **kw):  # the OS refusing the write of one split
        if "rl.parquet" in str(where):
            Path(where).write_bytes(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, *a, **kw)

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(OSError) as caught:  # the CLI's one description of a file-system failure
        run(cfg)
    assert re.search("disk is full.*free space.*chunks.*kept", describe_os_error(caught.value))
    names = [p.name for p in cfg.data_dir.rglob("*")]
    assert not [n for n in names if n.endswith(".tmp")] and "rl.parquet" not in names
    assert [n for n in names if n.startswith("extract-")] and "datagen_summary.json" not in names
    monkeypatch.setattr(pq, "write_table", real_write)
    run(cfg)
    summary = json.loads((cfg.data_dir / "datagen_summary.json").read_text())
    assert summary["chunks_reused"] == 1 and summary["teacher_calls"] == 0 and (cfg.data_dir / "rl.parquet").is_file()


def test_bad_inputs_give_one_line_fixes(tiny_model_dir, tmp_path):
    with pytest.raises(DatagenError, match=r"layer 7 is out of range.*blocks 0\.\.3"):
        run(smoke_cfg(tiny_model_dir, tmp_path / "a", "--layer", "7"))
    with pytest.raises(DatagenError, match=r"layer 3 is the last block.*after the final norm.*between 0 and 2"):
        run(smoke_cfg(tiny_model_dir, tmp_path / "a", "--layer", "3"))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(DatagenError, match="no documents"):
        run(smoke_cfg(tiny_model_dir, tmp_path / "b", "--corpus", str(tmp_path / "empty.jsonl")))
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps({"text": f"tiny doc {i}"}) for i in range(3)))
    with pytest.raises(DatagenError, match="all 3 documents are too short.*lower --min_position") as err:
        run(smoke_cfg(tiny_model_dir, tmp_path / "c", "--corpus", str(tmp_path / "short.jsonl")))
    assert "\n" not in str(err.value)


def test_main_prints_counts_norms_and_samples(tiny_model_dir, tmp_path, capsys):
    from nla.cli import main

    assert (
        main(
            [
                "datagen",
                "--config",
                SMOKE,
                "--model",
                str(tiny_model_dir),
                "--output_dir",
                str(tmp_path),
                "--teacher",
                "extractive",
                "--max_docs",
                "100000",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    out = captured.out
    assert "av_sft" in out and "p75" in out and "suggested injection_scale" in out and out.count("->") >= 4
    assert "--max_docs 100000 but corpus" in captured.err  # a cap beyond the corpus is said, not silent
    assert (tmp_path / "data" / "config.yaml").is_file() and not (tmp_path / "datagen").exists()  # beside its output


@pytest.mark.distributed
def test_two_processes_shard_chunks_and_match_one_process(tiny_model_dir, tmp_path):
    """2 gloo processes split the extraction chunks; the datasets equal a single-process run's."""
    import os
    import subprocess
    import sys

    args = ["--config", SMOKE, "--model", str(tiny_model_dir), "--teacher", "extractive", "--max_docs", "150"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "launch/accelerate/cpu_2proc.yaml",
        "-m",
        "nla.cli",
        "datagen",
        *args,
        "--output_dir",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(" rows in ") == 1, proc.stdout  # only the main process reports
    two = tmp_path / "two" / "data"
    chunks = sorted(p.name for p in (two / ".work").glob("extract-*.parquet"))
    assert len(chunks) == 3  # 150 docs, 64 per chunk
    assert json.loads((two / "datagen_summary.json").read_text())["chunks_new"] == 2  # rank 0: chunks 0, 2; rank 1: 1
    one = smoke_cfg(tiny_model_dir, tmp_path / "one", "--max_docs", "150")
    run(one)
    assert sorted(p.name for p in (one.data_dir / ".work").glob("extract-*.parquet")) == chunks
    a, b = all_rows(one.data_dir), all_rows(two)
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert all(torch.allclose(x[3], y[3], atol=1e-5) for x, y in zip(a, b))


def test_base_model_needs_a_chat_template_and_takes_one_from_a_file(tmp_path):
    """A base model (no chat template) stops before extraction with the fix; --chat_template FILE
    makes the whole path work, and the AV saved by train-av carries the template."""
    from nla.models.av import load_av
    from nla.stages.train_av import run as train_av
    from nla.testing import CHAT_TEMPLATE, save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(DatagenError, match="no chat template.*--chat_template FILE") as err:
        run(smoke_cfg(base, tmp_path / "a"))
    assert "\n" not in str(err.value) and not (tmp_path / "a" / "data" / ".work").exists()
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    cfg = smoke_cfg(
        base,
        tmp_path / "b",
        "--chat_template",
        str(tmp_path / "chat.jinja"),
        "--av_steps",
        "1",
        "--av_eval_every",
        "1",
        "--av_save_every",
        "1",
    )
    run(cfg)
    out = train_av(cfg)
    av = load_av(out["checkpoint"], device="cpu")  # no --chat_template needed any more
    assert av.tokenizer.chat_template == CHAT_TEMPLATE


def test_the_next_token_claim_records_the_models_own_top1(tiny_model_dir, tmp_path):
    """--teacher_claims quote,next: datagen runs the whole model, records its most likely next token at
    each position (checked here against an independent full forward), and the explanation says it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nla.cli import main
    from nla.core.claims import quote
    from nla.data.splits import load_split

    assert (
        main(
            [
                "datagen",
                "--config",
                "configs/smoke.yaml",
                "--model",
                str(tiny_model_dir),
                "--output_dir",
                str(tmp_path),
                "--teacher",
                "extractive",
                "--teacher_claims",
                "quote,next",
                "--report_to",
                "none",
            ]
        )
        == 0
    )
    split = load_split(tmp_path / "data" / "av_sft.parquet")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    checked = 0
    for context, nxt, explanation in zip(
        split.columns["detokenized_text_truncated"], split.columns["model_next_token"], split.columns["explanation"]
    ):
        ids = tok(context, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(model(ids).logits[0, -1].argmax())
        assert nxt == tok.decode([top]), (context[-30:], nxt)
        assert explanation.endswith(f"; predicts {quote(nxt)}")
        checked += 1
    assert checked == len(split) > 0
    assert load_split(tmp_path / "data" / "rl.parquet").columns["model_next_token"]  # RL checks its claims too
