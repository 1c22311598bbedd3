"""The cross-model channel on two tiny random models of different architectures and tokenizers:
paired datagen (B's activation at the aligned place of the same text), B's AR trained on A's rows'
explanations, and `nla eval` of the pair (A's AV -> B's AR) with its translator and controls."""

from __future__ import annotations

import json

import pytest
import torch

from nla.cli import main
from nla.data.paired import paired_dir
from nla.data.splits import load_split, split_path
from nla.models.ar import read_ar_meta
from nla.models.backbone import block_output
from nla.models.sources import load_causal_lm, load_tokenizer
from nla.testing import save_tiny_architecture

LAYER_B = 2


def _common(out) -> list[str]:
    return [
        "--config",
        "configs/smoke.yaml",
        "--output_dir",
        str(out),
        "--teacher",
        "extractive",
        "--split_fractions",
        "0.25,0.25,0.1,0.15,0.25",
    ]


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    """Datagen of A (tiny llama, 600-token vocabulary) paired with B (tiny Gemma 3, 300 tokens, width 48)."""
    root = tmp_path_factory.mktemp("cross")
    a = save_tiny_architecture(root / "a", "llama")
    b = save_tiny_architecture(root / "b", "gemma3", seed=1, vocab_size=300, d_model=48)
    out = root / "run"
    rc = main(["datagen", *_common(out), "--model", str(a), "--paired_model", str(b), "--paired_layer", str(LAYER_B)])
    assert rc == 0
    return a, b, out


def test_paired_rows_are_the_same_texts_at_the_same_place(paired_run):
    a, b, out = paired_run
    summary = json.loads((out / "data" / "datagen_summary.json").read_text())
    record = summary["paired"]
    assert record["model_b"] == str(b) and record["layer_b"] == LAYER_B
    assert 0 < record["aligned"] <= record["positions"]
    assert record["aligned"] + record["dropped_unaligned"] == record["positions"]
    tok_b = load_tokenizer(str(b))
    model_b = load_causal_lm(str(b)).eval()
    total = 0
    for name in ("ar_sft", "test"):
        sa = load_split(split_path(out / "data", name))
        sb = load_split(split_path(paired_dir(out / "data"), name))
        assert sa.columns["doc_id"] == sb.columns["doc_id"]
        assert sa.columns["explanation"] == sb.columns["explanation"]
        assert sa.meta.extra["paired"]["role"] == "a" and sb.meta.extra["paired"]["role"] == "b"
        assert sb.meta.layer_index == LAYER_B and sb.vectors.shape[1] != sa.vectors.shape[1]
        total += len(sa)
        for i in range(len(sb)):
            ctx_a, ctx_b = sa.columns["detokenized_text_truncated"][i], sb.columns["detokenized_text_truncated"][i]
            # the two contexts end at the same character of the same text
            assert ctx_a.rstrip() and ctx_b.rstrip() and ctx_a[-3:] == ctx_b[-3:]
            ids = tok_b(ctx_b, add_special_tokens=True, return_tensors="pt")["input_ids"]
            pos = sb.columns["position"][i]
            with torch.no_grad():
                h = block_output(model_b, ids[:, : pos + 1], torch.ones_like(ids[:, : pos + 1]), LAYER_B)[0, -1]
            torch.testing.assert_close(sb.vectors[i].float(), h, atol=1e-3, rtol=1e-3)
            break  # one row a split: B's vector is B's block output at its aligned position
    assert total <= record["aligned"]


def test_the_cross_ar_refuses_another_model(paired_run, tmp_path, capsys):
    a, b, out = paired_run
    rc = main(["train-ar", *_common(out), "--model", str(a), "--ar_model", str(a)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "not of" in err[-1] and len(err[-1]) < 400
    rc = main(["train-ar", *_common(out), "--model", str(a), "--ar_model", str(b), "--ar_layer", "1"])
    assert rc != 0 and "not block 1" in capsys.readouterr().err


def test_datagen_through_eval_cross(paired_run, tmp_path, capsys):
    a, b, out = paired_run
    base = [*_common(out), "--model", str(a)]
    assert main(["train-ar", *base, "--ar_model", str(b)]) == 0
    assert main(["train-ar", *base, "--ar_model", str(b), "--ar_text", "context", "--ar_oracle_steps", "4"]) == 0
    assert main(["train-av", *base]) == 0
    own = [*_common(out / "b"), "--model", str(b), "--layer", str(LAYER_B), "--data_dir", str(paired_dir(out / "data"))]
    assert main(["train-av", *own]) == 0  # B's own AV on B's side of the same rows
    ar_meta = read_ar_meta(out / "ar_b" / "final" / "ar")
    assert ar_meta.extra["paired"]["model_b"] == str(b) and ar_meta.base_model == str(b)
    report_dir = tmp_path / "eval"

    def eval_argv(av, own_av, report, *extra) -> list[str]:
        folders = ["--av_checkpoint", str(av), "--ar_checkpoint", str(out / "ar_b" / "final"), "--own_av", str(own_av)]
        return ["eval", *base, *folders, "--report_dir", str(report), *extra]

    b_av = out / "b" / "av" / "final"
    oracle = ["--oracle_ar", str(out / "ar_oracle_b" / "final")]
    quick = ["--paraphrase_control", "false", "--reinjection_rows", "6"]
    rc = main(eval_argv(out / "av" / "final", b_av, report_dir, *oracle, *quick))
    assert rc == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["kind"] == "cross"
    channels = report["channels"]
    assert {"nla", "translator", "own_nla", "oracle", "teacher_text", "empty_text", "random_text", "mean"} <= set(
        channels
    )
    assert channels["mean"]["fve_nrm"] == pytest.approx(channels["nla"]["fve_floor"])  # one floor
    assert channels["translator"]["floats_per_vector"] == ar_meta.d_model
    for name in ("nla", "translator", "translator_added", "own_nla", "oracle"):
        r = report["reinjection"][name]
        assert r["kl"] >= 0 and r["kl_mean_baseline"] >= 0
    # B's own AV must explain B: A's AV in its place is refused in one line, before any work
    wrong = eval_argv(out / "av" / "final", out / "av" / "final", tmp_path / "wrong")
    assert main(wrong) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--own_av" in err and f"not block {LAYER_B} of" in err
    same_model = eval_argv(b_av, out / "av" / "final", tmp_path / "wrong")
    assert main(same_model) == 2  # B's AV and B's AR: a same-model pair, where --own_av means nothing
    assert "--own_av is for a cross pair" in capsys.readouterr().err
    rows = (report_dir / "rows.jsonl").read_text().splitlines()
    assert len(rows) == report["n"]
    assert "Cross-model channel" in (report_dir / "report.md").read_text()
    assert (report_dir / "report.html").read_text().startswith("<!doctype html>")


def test_the_cross_demo(paired_run, tmp_path):
    """`nla demo` with paired_model (what `make demo-cross` runs): A's data and AV, B's AR, B's oracle
    and B's own AV, and the channel, in summary.json."""
    a, b, _ = paired_run
    out = tmp_path / "demo"
    argv = [*_common(out), "--model", str(a), "--paired_model", str(b), "--paired_layer", str(LAYER_B)]
    assert main(["demo", *argv, "--eval_max_rows", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cross = summary["cross"]
    assert cross["kind"] == "cross" and cross["checkpoint"]["av"] == str(out / "av" / "final" / "av")
    assert {"nla", "translator", "own_nla", "oracle"} <= set(cross["channels"])
    assert (out / "eval_cross" / "report.md").is_file() and (out / "b" / "av" / "final").is_dir()
    assert not (out / "rl").exists() and summary["datagen"]["paired"]["aligned"] > 0
