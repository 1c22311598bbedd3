"""`nla verbalize`: input readers, text -> activations -> explanations (API and CLI), best-of-K by AR."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_eval import SMOKE, build_toy  # the shared trained toy NLA (built once per session)

from nla.cli import main as cli
from nla.core.config import ConfigError
from nla.data.splits import load_split
from nla.models.pair import load_nla
from nla.stages.verbalize import explain_text, explain_vectors, parse_positions, read_texts, read_vectors

TEXT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.getbasetemp() / "nla-eval-toy")


@pytest.fixture(scope="module")
def nla(toy):
    return load_nla(toy / "run", device="cpu", max_new_tokens=24)


def test_readers(tmp_path):
    assert parse_positions("3, 7,12") == [3, 7, 12] and parse_positions(None) is None
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_positions("3;7")
    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "v.npy", v)
    save_file({"acts": torch.from_numpy(v)}, str(tmp_path / "v.safetensors"))
    for name in ("v.npy", "v.safetensors"):
        vectors, rows = read_vectors(tmp_path / name, 4)
        assert torch.equal(vectors, torch.from_numpy(v)) and rows[2] == {"doc_id": "v", "position": 2}
    with pytest.raises(ConfigError, match=r"shape \(3, 4\).*\[n, 8\]"):
        read_vectors(tmp_path / "v.npy", 8)
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match="exactly one"):
        read_vectors(tmp_path / "two.safetensors", 4)
    (tmp_path / "t.jsonl").write_text('{"text": "abc", "positions": [1]}\n\n{"text": "de", "doc_id": "x"}\n')
    docs = read_texts(tmp_path / "t.jsonl")
    assert [d["positions"] for d in docs] == [[1], None] and docs[1]["doc_id"] == "x"
    (tmp_path / "bad.jsonl").write_text('{"text": "abc"}\nnot json\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        read_texts(tmp_path / "bad.jsonl")


def test_api_text_and_vectors_agree(nla, tiny_tokenizer):
    """explain_text == extract + explain_vectors, greedy; all non-special positions by default."""
    rows = explain_text(TEXT, nla=nla, temperature=0.0, max_new_tokens=24)
    ids = tiny_tokenizer(TEXT)["input_ids"]
    assert [r["position"] for r in rows] == list(range(len(ids)))  # this tokenizer adds no BOS
    assert [r["token"] for r in rows] == [tiny_tokenizer.decode([i]) for i in ids]
    picked = explain_text(TEXT, nla=nla, positions=[3, 7], temperature=0.0, max_new_tokens=24)
    assert [r["position"] for r in picked] == [3, 7]
    assert [r["explanation"] for r in picked] == [rows[3]["explanation"], rows[7]["explanation"]]
    assert all(
        r["selection"] == "greedy" and "fve_nrm" in r and r["var_source"].startswith("ar_sidecar") for r in picked
    )
    var = float(nla.ar.meta.extra["ar_target_variance"])
    assert picked[0]["fve_nrm"] == pytest.approx(1 - picked[0]["mse_nrm"] / var)


def test_vectors_explained_like_the_training_data(toy, nla):
    """On held-out toy vectors the greedy explanation is mostly the right word, and its FVE is high."""
    test = load_split(toy / "data" / "test.parquet")
    rows = explain_vectors(test.vectors, nla=nla, temperature=0.0, max_new_tokens=24)
    right = sum(r["explanation"] == e for r, e in zip(rows, test.column("explanation")))
    assert right >= 12 and np.mean([r["fve_nrm"] for r in rows]) > 0.5, rows
    zero = explain_vectors(torch.zeros(64), nla=nla, temperature=0.0, max_new_tokens=24)  # a [d] vector is one row
    assert len(zero) == 1 and zero[0]["row"] == 0 and zero[0]["fve_nrm"] is not None


def test_batch_size_is_rows_per_generate_call(toy, nla):
    """`batch_size` sets how many sequences one generate call runs; the greedy text does not depend on it."""
    vectors = load_split(toy / "data" / "test.parquet").vectors[:5]
    calls, rollout = [], nla.verbalizer.rollout

    def counted(v, *args, **kw):
        calls.append(len(v))
        return rollout(v, *args, **kw)

    nla.verbalizer.rollout = counted
    try:
        one = nla.explain(vectors, 1, 0.0, 24, batch_size=5)
        assert calls == [5]
        calls.clear()
        two = nla.explain(vectors, 1, 0.0, 24, batch_size=2)
        assert calls == [2, 2, 1]
    finally:
        del nla.verbalizer.rollout
    assert [s.text for (s,) in one] == [s.text for (s,) in two]


def test_cli_text_with_rerank(toy, tmp_path, capsys):
    out = tmp_path / "e.jsonl"
    code = cli(
        [
            "verbalize",
            "--config",
            SMOKE,
            "--checkpoint",
            str(toy / "run"),
            "--text",
            TEXT,
            "--positions",
            "3,7,9",
            "--num_samples",
            "4",
            "--rerank_with_ar",
            "--verbalize_temperature",
            "1.0",
            "--av_max_new_tokens",
            "24",
            "--output_dir",
            str(tmp_path / "run"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "token" in printed and "explanation" in printed and "best_of_4_by_AR" in printed
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["position"] for r in rows] == [3, 7, 9]
    page = out.with_suffix(".html").read_text()  # the browsable table of the same rows
    assert page.count("<mark>") == 3 and all(
        r["explanation"] is None or html.escape(r["explanation"][:10]) in page for r in rows
    )
    for r in rows:
        assert r["selection"] == "best_of_4_by_AR" and len(r["candidates"]) == 4
        ok = [c["mse_nrm"] for c in r["candidates"] if not c["failed"]] or [c["mse_nrm"] for c in r["candidates"]]
        assert r["mse_nrm"] == pytest.approx(min(ok))  # the kept sample is the AR's best


def test_cli_vectors_file_and_no_ar(toy, tmp_path, capsys):
    """Reference-style AV only (no AR): explanations without scores; rerank then refuses."""
    av = str(toy / "run" / "av" / "final")
    base = ["verbalize", "--config", SMOKE, "--output_dir", str(tmp_path / "run"), "--av_max_new_tokens", "24"]
    code = cli(
        base + ["--av_checkpoint", av, "--vectors", str(toy / "data" / "test.parquet"), "--verbalize_temperature", "0"]
    )
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "verbalize" / "explanations.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[5]["doc_id"] == "test-5" and "fve_nrm" not in rows[0]
    assert rows[0]["temperature"] == 0 and rows[0]["selection"] == "greedy"  # its own option, not RL's temperature
    capsys.readouterr()
    assert cli(base + ["--av_checkpoint", av, "--text", TEXT, "--rerank_with_ar", "--num_samples", "2"]) == 2
    assert cli(base + ["--av_checkpoint", av, "--text", TEXT, "--vectors", "x.npy"]) == 2
    assert cli(base + ["--av_checkpoint", av, "--text", TEXT, "--positions", "500"]) == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("nla verbalize")]
    assert [e.split(": error: ")[0] for e in errors] == ["nla verbalize"] * 3, errors
    assert "no AR found" in errors[0] and "exactly one input" in errors[1] and "beyond its" in errors[2]


def test_a_text_cut_to_max_tokens_is_said(nla, capsys):
    explain_text(TEXT, nla=nla, positions=[1], max_tokens=4, max_new_tokens=4)
    assert "cut to their first 4 tokens" in capsys.readouterr().err
    explain_text(TEXT, nla=nla, positions=[1], max_new_tokens=4)
    assert "cut to" not in capsys.readouterr().err
