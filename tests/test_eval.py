"""`nla eval`: known-answer scoring, controls, the length curve, both checkpoint formats, errors.

The end-to-end tests share one trained toy NLA (built once per session, ~20 s): an AV trained to
name which of 4 centres a vector was drawn around, and an AR trained to map the name back.
"""

from __future__ import annotations

import html
import json
import shutil
import socket

import numpy as np
import pytest
import torch
import yaml

from nla.cli import main as cli
from nla.core import templates
from nla.core.config import from_flat_dict, load_yaml
from nla.core.metrics import normalize, target_variance
from nla.core.sidecar import Meta, make_token_spec
from nla.data.splits import write_split
from nla.data.teacher import LocalParaphraser
from nla.stages.controls import (
    Scorer,
    control_fves,
    length_curve,
    paraphrase_scores,
    reverse_claims,
    truncate_tokens,
    uninformative_vectors,
)
from nla.stages.evaluate import EvalArgs, run
from nla.testing import build_tiny_tokenizer, save_tiny_model

MARKER, D, LAYER = "㈠", 64, 1
WORDS = ["apple", "river", "music", "stone"]
SMOKE = "configs/smoke.yaml"


# ---------------------------------------------------------------- the shared toy NLA


def build_toy(root):
    """Model, data (av_sft/ar_sft/val/test) and trained AV + AR under `root`; reused when already built."""
    from nla.stages import train_ar, train_av

    if (root / "ready").is_file():
        return root
    tok = build_tiny_tokenizer()
    # init std 0.2: at HF's 0.02 a tiny model's text barely depends on the prompt (see nla/testing.py).
    save_tiny_model(root / "model", d_model=D, seed=0, initializer_range=0.2)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(len(WORDS), D, generator=g) * 3
    meta = Meta(
        "nla_dataset",
        make_token_spec(tok, MARKER),
        d_model=D,
        layer_index=LAYER,
        base_model=str(root / "model"),
        extra={"suggested_injection_scale": 8.0},
    )
    for name, n in (("av_sft", 256), ("ar_sft", 128), ("val", 32), ("test", 16)):
        label = torch.randint(0, len(WORDS), (n,), generator=g)
        expl = [WORDS[i] for i in label]
        prompts = (
            [templates.ar_prompt(e) for e in expl] if name == "ar_sft" else [templates.av_user_message(MARKER)] * n
        )
        cols = {
            "prompt": prompts,
            "response": [templates.av_response(e) for e in expl],
            "explanation": expl,
            # the label is not the last token, so a lookup of the last tokens cannot read it (the NLA can)
            "detokenized_text_truncated": [f"{e} is what this text is about" for e in expl],
            "doc_id": [f"{name}-{i}" for i in range(n)],
            "position": list(range(n)),
        }
        write_split(root / "data" / f"{name}.parquet", centres[label] + torch.randn(n, D, generator=g), cols, meta)
    base = config(root, root / "run")
    train_av.run(base.replace(av_steps=80, av_batch_size=16, av_lr=1e-2, av_eval_every=1000, av_save_every=1000))
    train_ar.run(
        base.replace(ar_steps=40, ar_batch_size=8, ar_lr=5e-3, ar_lora_r=8, ar_eval_every=1000, ar_save_every=1000)
    )
    (root / "ready").write_text("ok")
    return root


def config(root, out, **over):
    values = {
        **load_yaml(SMOKE),
        "model": str(root / "model"),
        "data_dir": str(root / "data"),
        "output_dir": str(out),
        "resume": "never",
        "av_lora_r": 8,
        "av_max_new_tokens": 24,
        "teacher": "extractive",
        **over,
    }
    return from_flat_dict(values)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.getbasetemp() / "nla-eval-toy")


# ---------------------------------------------------------------- pure scoring


def test_scorer_known_answers():
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(12, D, generator=g) + 2.0  # a shared offset: anisotropic, like real activations
    scorer = Scorer(scale=8.0, var=target_variance(targets, 8.0), n_candidates=16)
    perfect = scorer.headline(3.0 * targets, targets)  # the norm does not matter, only the direction
    assert perfect["fve_nrm"] == pytest.approx(1.0, abs=1e-5) and perfect["top1_retrieval"] == 1.0
    assert perfect["cos_mean"] == pytest.approx(1.0, abs=1e-5) and perfect["fve_centered"] == pytest.approx(
        1.0, abs=1e-4
    )
    constant = scorer.headline(normalize(targets, 8.0).mean(0, keepdim=True).expand_as(targets), targets)
    assert constant["fve_nrm"] <= 0.0 and constant["fve_vs_mean_pred"] == pytest.approx(0.0, abs=1e-5)
    # the floor: one constant prediction, the raw targets' mean direction, whatever the model predicted
    floor = scorer.fve(targets.mean(0, keepdim=True).expand_as(targets), targets)
    assert perfect["fve_floor"] == constant["fve_floor"] == pytest.approx(floor) and floor < 0.0
    assert constant["cos_mean"] > 0.5  # raw cosine flatters the mean direction; the FVE does not
    shifted = scorer.headline(targets.roll(1, dims=0), targets)  # every row predicts its neighbour's vector
    assert shifted["top1_retrieval"] == 0.0 and shifted["fve_nrm"] < 0.0
    assert float(scorer.row_fve(targets.roll(1, 0), targets).mean()) == pytest.approx(
        scorer.fve(targets.roll(1, 0), targets), abs=1e-5
    )


def word_pipeline(noise=0.0):
    """A known NLA on centre-drawn vectors: explain = nearest centre's word, predict = that centre."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(len(WORDS), D, generator=g) * 3
    label = torch.arange(16) % len(WORDS)
    vectors = centres[label] + noise * torch.randn(16, D, generator=g)

    def explain(v):
        return [
            WORDS[int(i)] if n > 0 else None
            for i, n in zip((normalize(v, 1.0) @ normalize(centres, 1.0).T).argmax(1), v.norm(dim=1))
        ]

    def predict(texts):  # "" / None / unknown words carry nothing: a constant guess
        return torch.stack([centres[WORDS.index(t)] if t in WORDS else torch.ones(D) for t in texts])

    return vectors, explain, predict


def test_controls_on_a_known_pipeline():
    vectors, explain, predict = word_pipeline()
    scorer = Scorer(8.0, target_variance(vectors, 8.0))
    texts = explain(vectors)
    assert scorer.fve(predict(texts), vectors) == pytest.approx(1.0, abs=1e-5)
    controls = control_fves(explain, predict, vectors, texts, scorer)
    assert set(controls) == {"shuffled_vector", "zero_vector", "mean_vector", "empty_text", "random_text"}
    for name, c in controls.items():
        assert c["fve_nrm"] < 0.5, (name, c)  # nothing reconstructs like the real explanation
    assert controls["empty_text"]["fve_nrm"] <= 0.0 and controls["zero_vector"]["fve_nrm"] <= 0.0
    assert controls["shuffled_vector"]["top1_retrieval"] < 0.5


def test_greedy_controls_reuse_the_real_explanations():
    """A deterministic AV wrote row j's text already: the same numbers, and only the two
    uninformative vectors are explained again."""
    vectors, explain, predict = word_pipeline()
    scorer = Scorer(8.0, target_variance(vectors, 8.0))
    texts = explain(vectors)
    calls = []

    def counting(v):
        calls.append(len(v))
        return explain(v)

    regenerated = control_fves(counting, predict, vectors, texts, scorer)
    reused = control_fves(counting, predict, vectors, texts, scorer, deterministic=True)
    assert calls == [len(vectors) + 2, 2]
    assert reused == regenerated
    given = control_fves(
        counting,
        predict,
        vectors,
        texts,
        scorer,
        deterministic=True,
        uninformative_texts=explain(uninformative_vectors(vectors)),
    )
    assert calls == [len(vectors) + 2, 2] and given == regenerated  # written in the rows' call: no call of its own


def test_length_curve_is_monotone_when_cutting_removes_words(tiny_tokenizer):
    """AR stand-in: sum of the vectors of the whole words it reads; targets = all 8 words' sum."""
    g = torch.Generator().manual_seed(2)
    vocab = [
        "apple",
        "river",
        "music",
        "stone",
        "cloud",
        "engine",
        "violin",
        "castle",
        "purple",
        "garden",
        "forest",
        "silver",
    ]
    emb = {w: torch.randn(D, generator=g) for w in vocab}
    texts = [" ".join(vocab[(i + j) % len(vocab)] for j in range(8)) for i in range(10)]
    targets = torch.stack([sum(emb[w] for w in t.split()) for t in texts])

    def predict(batch):
        return torch.stack(
            [sum((emb[w] for w in (t or "").split() if w in emb), torch.full((D,), 1e-3)) for t in batch]
        )

    assert truncate_tokens(["apple river", None], tiny_tokenizer, 100) == ["apple river", None]
    scorer = Scorer(8.0, target_variance(targets, 8.0))
    curve = length_curve(predict, texts, predict(texts), targets, tiny_tokenizer, scorer, lengths=(2, 4, 8, 16))
    values = list(curve.values())
    assert list(curve) == ["2", "4", "8", "16", "full"]
    assert all(a < b for a, b in zip(values[:-2], values[1:-1])) and values[-2] <= values[-1] + 1e-6, curve
    assert curve["full"] == pytest.approx(1.0, abs=1e-5) and curve["2"] < 0.6


def test_paraphrase_scores_and_model_free_paraphrase(tiny_tokenizer):
    vectors, explain, predict = word_pipeline()
    texts = explain(vectors)
    scorer = Scorer(8.0, target_variance(vectors, 8.0))
    same = paraphrase_scores(list(texts), texts, predict(texts), predict, vectors, scorer)
    assert same["fve_retained"] == pytest.approx(1.0) and same["fail_rate"] == 0.0 and same["n"] == 16
    broken = paraphrase_scores([None] * 4 + ["gibberish"] * 12, texts, predict(texts), predict, vectors, scorer)
    assert broken["n"] == 12 and broken["fail_rate"] == pytest.approx(0.25) and broken["fve_retained"] < 0.5
    assert (
        reverse_claims("a loop; a list ;a dict") == "a dict; a list; a loop"
        and reverse_claims("one claim") == "one claim"
    )
    from nla.data.teacher import LocalTeacher

    para = LocalParaphraser.wrap(LocalTeacher(None, tiny_tokenizer, "m"))
    prompt = para.prompt_text("a loop over a list")
    assert "Rewrite the following description" in prompt and "<text>a loop over a list</text>" in prompt
    assert prompt.endswith("<explanation>") and para.identity != LocalTeacher(None, tiny_tokenizer, "m").identity


def test_flags_name_the_failure_modes():
    from nla.stages.report import flags

    controls = {k: {"fve_nrm": -0.5} for k in ("shuffled_vector", "zero_vector", "mean_vector", "random_text")}
    good = {
        "fve_nrm": 0.6,
        "controls": {**controls, "empty_text": {"fve_nrm": 0.0}},
        "top1_retrieval": 0.8,
        "top1_chance": 1 / 16,
        "extraction_fail_rate": 0.0,
        "non_latin_rate": 0.0,
    }
    assert flags(good) == []
    blind = {**good, "controls": {**controls, "empty_text": {"fve_nrm": 0.58}}}
    assert any("content-blind" in f for f in flags(blind))
    collapsed = {**good, "top1_retrieval": 0.07}
    assert any("template collapse" in f for f in flags(collapsed))
    failed = {**blind, "extraction_fail_rate": 1.0, "non_latin_rate": 0.5}
    assert (
        len(flags(failed)) == 2 and "non-Latin" in flags(failed)[0] and "every explanation failed" in flags(failed)[1]
    )


def test_stage_options_do_not_shadow_config_keys():
    import dataclasses

    from nla.core.config import valid_keys
    from nla.stages.verbalize import VerbalizeArgs

    for cls in (EvalArgs, VerbalizeArgs):
        assert not {f.name for f in dataclasses.fields(cls)} & set(valid_keys()), cls


# ---------------------------------------------------------------- end to end on the toy


def eval_args(**kw):
    return EvalArgs(**{"eval_temperature": 0.0, **kw})


def test_eval_on_trained_toy(toy, tmp_path):
    cfg = config(toy, tmp_path / "out", independent_ar=str(toy / "run" / "ar" / "final"))
    report = run(cfg, eval_args(checkpoint=str(toy / "run"), data=str(toy / "data" / "test.parquet")))
    assert report["n"] == 16 and report["fve_nrm"] > 0.5 and report["extraction_fail_rate"] < 0.2, report
    for name, c in report["controls"].items():
        assert c["fve_nrm"] < report["fve_nrm"] - 0.5, (name, report["controls"])
    assert report["var_source"].startswith("ar_sidecar") and report["fve_definition"].startswith("strict")
    assert report["top1_retrieval"] > report["top1_chance"]
    assert report["paraphrase"]["fve_retained"] == pytest.approx(1.0)  # one-claim answers: reversal is the identity
    assert report["order_shuffled"]["n"] == 0 and report["order_shuffled"]["fve_nrm"] is None  # nothing to reorder
    assert set(report["fve_by_length"]) == {"8", "16", "32", "64", "full"}
    # the same AR given as the independent one must give the same number
    assert report["independent_ar"]["fve_nrm"] == pytest.approx(report["fve_nrm"], abs=1e-5)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["fve_nrm"] == report["fve_nrm"] and saved["controls"] == report["controls"]
    for f in ("report.md", "controls.png", "fve_by_length.png", "fve_hist.png", "rows.jsonl"):
        assert (tmp_path / "out" / f).stat().st_size > 100, f
    base = report["baselines"]
    assert base["train_rows"] == 256 + 128 and base["splits"] == [
        "av_sft",
        "ar_sft",
    ]  # the rows the AV and AR trained on
    assert base["token_lookup"]["matched"] == 1.0 and base["token_lookup"]["fve_nrm"] < 0.1  # every row ends in "about"
    assert report["lookup_margin"] == pytest.approx(
        report["fve_nrm"] - max(base["token_lookup"]["fve_nrm"], base["bigram_lookup"]["fve_nrm"])
    )
    assert report["claims"]["format"] == "free" and report["claims"]["unchecked"] == [
        "phrase"
    ]  # no rule checks free text
    assert report["claims"]["types"]["phrase"]["distinct"] == 4
    md = (tmp_path / "out" / "report.md").read_text()
    assert "shuffled_vector" in md and "strict" in md and "none: the real score clears every control" in md
    assert "token_lookup" in md and "## Claims" in md
    rows = [json.loads(x) for x in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert np.mean([r["fve_nrm"] for r in rows]) == pytest.approx(report["fve_nrm"], abs=1e-5)
    assert sum(r["explanation"] == r["teacher_explanation"] for r in rows) >= 12
    assert all(("response" in r) == r["failed"] for r in rows)  # a failed answer's raw text is kept for reading
    logged = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval/fve_nrm"] == report["fve_nrm"] and "eval/control/empty_text" in logged[-1]
    assert (
        logged[-1]["eval/control/token_lookup"] == base["token_lookup"]["fve_nrm"]
        and "eval/lookup_margin" in logged[-1]
    )


def test_eval_from_texts_with_local_paraphraser(toy, tmp_path, tiny_tokenizer):
    """--texts: datagen's position rule, activations = the base model's hidden_states[K+1]; local teacher runs."""
    from transformers import AutoModelForCausalLM

    texts = [
        "def add(a, b):\n    return a + b  # numbers in, their sum out, nothing else",
        "x = [i * i for i in range(10)] and more",
    ]
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"text": t, "doc_id": f"d{i}"}) + "\n" for i, t in enumerate(texts))
    )
    cfg = config(toy, tmp_path / "out", teacher="local", min_position=4, positions_per_doc=3)
    report = run(cfg, eval_args(checkpoint=str(toy / "run"), texts=str(tmp_path / "t.jsonl")))
    rows = [json.loads(x) for x in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert report["n"] == 6 == len(rows) and all(r["position"] >= 4 for r in rows)
    assert all(("response" in r) == r["failed"] for r in rows)
    assert report["paraphrase"]["method"].startswith("teacher local:") and report["paraphrase"]["fail_rate"] is not None
    assert (tmp_path / "out" / "paraphrase_cache.jsonl").is_file()
    # new text has no training split: the lookup is not computed, and the report says why
    assert "--texts" in report["baselines"]["skipped"] and report["lookup_margin"] is None
    assert "not computed" in (tmp_path / "out" / "report.md").read_text()
    assert report["claims"]["format"] == "free"  # the toy AV's sidecar records its (free) dataset format
    # the vectors explained are the plain base model's block-K outputs (the AV's LoRA switched off)
    from nla.models.pair import load_nla
    from nla.stages.verbalize import extract_text_rows

    nla = load_nla(toy / "run", device="cpu")
    vectors, info = extract_text_rows(nla, [{"text": texts[0], "doc_id": "d0", "positions": [4, 9]}], 256)
    base = AutoModelForCausalLM.from_pretrained(toy / "model").eval()
    ids = tiny_tokenizer(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = base(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
    assert torch.allclose(vectors, hidden[[4, 9]], atol=1e-5) and [r["position"] for r in info] == [4, 9]


def to_reference_format(toy, dest, ar_layer_field: str = "critic"):
    """Our trained pair, rewritten in the published release layout (full weights, old field names;
    only the AR's sidecar names the layer, as `critic.extraction_layer_index` or `ar.num_hidden_layers`)."""
    from safetensors.torch import save_file

    from nla.models.ar import load_ar
    from nla.models.av import load_av

    av = load_av(toy / "run" / "av" / "final", device="cpu")
    av.model.merge_and_unload().save_pretrained(dest / "av")
    av.tokenizer.save_pretrained(dest / "av")
    ar, tok = load_ar(toy / "run" / "ar" / "final")
    ar.backbone.merge_and_unload().save_pretrained(dest / "ar")  # config.json: K+1 blocks
    tok.save_pretrained(dest / "ar")
    save_file({"weight": ar.head.weight.detach().contiguous()}, str(dest / "ar" / "value_head.safetensors"))
    tokens = json.loads(json.dumps(make_token_spec(tok, MARKER).__dict__))
    common = {
        "kind": "nla_model",
        "schema_version": 1,
        "stage": "rl",
        "base_checkpoint": "org/tiny-base",
        "d_model": D,
        "extraction": {"injection_scale": 8.0, "mse_scale": 8.0},
        "tokens": tokens,
        "prompt_templates": {"actor": templates.AV_TEMPLATE, "critic": templates.AR_TEMPLATE},
    }
    layer = (
        {"critic": {"extraction_layer_index": LAYER}}
        if ar_layer_field == "critic"
        else {"ar": {"num_hidden_layers": LAYER}}
    )
    (dest / "av" / "nla_meta.yaml").write_text(yaml.safe_dump({**common, "role": "actor"}, allow_unicode=True))
    (dest / "ar" / "nla_meta.yaml").write_text(
        yaml.safe_dump({**common, "role": "critic", **layer}, allow_unicode=True)
    )


@pytest.mark.parametrize("ar_layer_field", ["critic", "ar"])
def test_reference_release_pair_scores_like_ours(toy, tmp_path, ar_layer_field):
    to_reference_format(toy, tmp_path / "release", ar_layer_field)
    data = str(toy / "data" / "test.parquet")
    ours = run(
        config(toy, tmp_path / "ours"), eval_args(checkpoint=str(toy / "run"), data=data, paraphrase_control=False)
    )
    release = {f"{role}_checkpoint": str(tmp_path / "release" / role) for role in ("av", "ar")}
    ref = run(config(toy, tmp_path / "ref", **release), eval_args(data=data, paraphrase_control=False))
    assert ref["var_source"].startswith("these_vectors")  # the release sidecar records no training Var
    assert ref["mse_mean"] == pytest.approx(ours["mse_mean"], abs=1e-4) and ref["cos_mean"] == pytest.approx(
        ours["cos_mean"], abs=1e-5
    )
    assert "paraphrase" not in ref
    # verbalizing text needs the layer: the released AV takes its AR's; alone, it says what is missing
    from nla.core.sidecar import SidecarError
    from nla.stages.verbalize import explain_text

    release = tmp_path / "release"
    rows = explain_text(
        "def add(a, b): return a + b",
        positions=[3, 6],
        av=str(release / "av"),
        ar=str(release / "ar"),
        target_model=str(toy / "model"),
        device="cpu",
        max_new_tokens=6,
    )
    assert len(rows) == 2 and all("mse_nrm" in r for r in rows)
    with pytest.raises(SidecarError, match="names no layer"):
        explain_text("def f(): pass", av=str(release / "av"), target_model=str(toy / "model"), device="cpu")


def test_checkpoint_resolution(toy, tmp_path):
    """A run folder means rl/final when RL ran, else the SFT finals; --av_checkpoint/--ar_checkpoint override halves."""
    from nla.models.pair import resolve_paths

    run_dir = toy / "run"
    sft = resolve_paths(run_dir)
    assert sft.av == run_dir / "av" / "final" / "av" and sft.ar == run_dir / "ar" / "final" / "ar"
    assert resolve_paths(run_dir / "av" / "final", need_ar=False).ar is None
    rl = tmp_path / "run" / "rl" / "final"
    for sub in ("av", "ar"):
        shutil.copytree(run_dir / sub / "final" / sub, rl / sub)
    assert resolve_paths(tmp_path / "run") == resolve_paths(rl) and resolve_paths(rl).av == rl / "av"
    mixed = resolve_paths(rl, ar=run_dir / "ar" / "final")
    assert mixed.av == rl / "av" and mixed.ar == run_dir / "ar" / "final" / "ar"
    assert resolve_paths(None, av=rl / "av", need_ar=False).av == rl / "av"  # the model folder itself


def _broken_copy(toy, tmp_path, kind):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy / "run" / "av" / "final" / "av", ckpt / "av")
    shutil.copytree(toy / "run" / "ar" / "final" / "ar", ckpt / "ar")
    side_path = ckpt / ("ar" if kind == "d_model" else "av") / "nla_meta.yaml"
    side = yaml.safe_load(side_path.read_text())
    if kind == "no_sidecar":
        side_path.unlink()
        return ckpt
    if kind == "d_model":
        side["d_model"] = 128
    elif kind == "marker":
        side["tokens"]["injection_char"] = "marker"  # several tokens in any tokenizer
    elif kind == "layer":
        side["extraction"]["layer_index"] = 2  # the AV claims another layer than its AR
    side_path.write_text(yaml.safe_dump(side, allow_unicode=True))
    return ckpt


@pytest.mark.parametrize(
    "kind, message",
    [
        ("no_sidecar", "nla_meta.yaml"),
        ("d_model", "d_model is 128"),
        ("marker", "encodes to"),
        ("layer", "explains layer 2 but the AR reconstructs layer 1"),
    ],
)
def test_bad_checkpoint_is_a_one_line_cli_error(toy, tmp_path, capsys, kind, message):
    ckpt = _broken_copy(toy, tmp_path, kind)
    code = cli(
        [
            "eval",
            "--config",
            SMOKE,
            "--checkpoint",
            str(ckpt),
            "--data",
            str(toy / "data" / "test.parquet"),
            "--output_dir",
            str(tmp_path / "out"),
            "--av_max_new_tokens",
            "24",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()  # (transformers' load bars may come first)
    assert code == 2 and err[-1].startswith("nla eval: error:") and message in err[-1], err
    assert sum(line.startswith("nla eval") for line in err) == 1


def test_missing_inputs_are_one_line_cli_errors(toy, tmp_path, capsys):
    base = ["eval", "--config", SMOKE, "--output_dir", str(tmp_path / "out")]
    assert cli(base + ["--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert cli(base + ["--checkpoint", str(toy / "run"), "--data", str(tmp_path / "none.parquet")]) == 2
    assert cli(base + ["--av_checkpoint", str(toy / "run" / "av" / "final")]) == 2  # eval needs an AR
    # an AR that reads explanations is no context oracle: refused before any explaining
    assert cli(base + ["--checkpoint", str(toy / "run"), "--oracle_ar", str(toy / "run" / "ar" / "final")]) == 2
    errors = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("nla eval")]
    assert len(errors) == 4 and all(e.startswith("nla eval: error:") for e in errors), errors
    assert "no such folder" in errors[0] and "none.parquet" in errors[1] and "no AR" in errors[2]
    assert "not a context-oracle AR" in errors[3] and "--ar_text context" in errors[3]
    assert not (tmp_path / "out" / "report.json").exists()


def test_rl_curve_reads_held_out_series_and_plots(tmp_path):
    import json as _json

    from nla.stages.plots import plot_rl_curve, rl_curve_points

    rows = [
        {"stage": "rl", "step": 0, "rl/val_fve_nrm": 0.1, "rl/val_fve_nrm_sft_ar": 0.1},
        {"stage": "rl", "step": 5, "rl/loss": 1.0},
        {"stage": "rl", "step": 10, "rl/val_fve_nrm": 0.3, "rl/val_fve_nrm_sft_ar": float("nan")},
        {"stage": "rl", "step": 10, "rl/val_fve_nrm": 0.35},  # a resumed run logs a step again: the last wins
        {"stage": "train-ar", "step": 10, "rl/val_fve_nrm": 9.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(_json.dumps(r) + "\n" for r in rows) + '{"torn')
    curve = rl_curve_points(path)
    assert curve == {"live AR (co-trained)": [(0, 0.1), (10, 0.35)], "SFT AR (never trained by RL)": [(0, 0.1)]}
    png = plot_rl_curve(curve, tmp_path / "curve.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_fraction_of_oracle_is_measured_from_the_floor():
    from nla.stages.evaluate import fraction_of_oracle

    assert fraction_of_oracle(0.6, 0.6, -0.1) == pytest.approx(1.0)  # as good as the oracle
    assert fraction_of_oracle(-0.1, 0.6, -0.1) == pytest.approx(0.0)  # one constant guess
    assert fraction_of_oracle(0.25, 0.6, -0.1) == pytest.approx(0.5)
    assert fraction_of_oracle(-0.3, 0.6, -0.1) < 0  # confidently wrong: below the floor
    assert fraction_of_oracle(0.2, -0.2, -0.1) is None  # an oracle no better than the floor measures nothing


def test_claims_split_outside_quotes_and_reorder():
    from nla.core.claims import split_claims
    from nla.stages.controls import shuffle_claims

    text = 'ends with "a; b. c \\" d; e"; about queue'
    assert split_claims(text) == ['ends with "a; b. c \\" d; e"', "about queue"]
    assert split_claims("Reads code. Expects a colon! Next: a body; topic python") == [
        "Reads code.",
        "Expects a colon!",
        "Next: a body",
        "topic python",
    ]
    assert shuffle_claims(text, 0) == 'about queue; ends with "a; b. c \\" d; e"'
    assert shuffle_claims("one phrase only", 0) is None
    many = "a; b; c; d; e"
    assert shuffle_claims(many, 1) != many and sorted(split_claims(shuffle_claims(many, 1))) == list("abcde")


def test_order_shuffle_control_separates_meaning_from_position():
    """An AR that reads a bag of words keeps its FVE when phrases move; one that reads only the
    first phrase loses it."""
    from nla.stages.controls import order_shuffled_scores

    g = torch.Generator().manual_seed(3)
    words = ["apple", "river", "music", "stone"]
    emb = {w: torch.randn(D, generator=g) for w in words}
    texts = [f"{words[i % 4]}; {words[(i + 1) % 4]}; {words[(i + 2) % 4]}" for i in range(12)]
    targets = torch.stack([sum(emb[w] for w in t.split("; ")) for t in texts])
    scorer = Scorer(8.0, target_variance(targets, 8.0))

    def bag(ts):
        return torch.stack([sum(emb[w.strip()] for w in t.split(";")) for t in ts])

    def first(ts):
        return torch.stack([emb[t.split(";")[0].strip()] * 3 for t in ts])

    kept = order_shuffled_scores(texts, bag(texts), bag, targets, scorer)
    assert kept["n"] == 12 and kept["fve_retained"] == pytest.approx(1.0, abs=1e-5)
    lost = order_shuffled_scores(texts, first(texts), first, targets, scorer)
    assert lost["fve_nrm"] < lost["fve_original"] - 0.2


def test_reinjection_of_the_true_vector_recovers_everything(tiny_tokenizer, tmp_path):
    """On datagen's own rows: patching each row's activation back changes nothing (KL 0,
    recovered 1); the mean and zero patches do change the next token; a row whose context does not
    tokenize back to its position is left out, never patched at the wrong place."""
    from nla.data.splits import load_split
    from nla.models.sources import load_causal_lm
    from nla.stages.reinjection import reinjection_scores
    from nla.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", initializer_range=0.2)  # output that depends on the input
    assert (
        cli(
            [
                "datagen",
                "--config",
                "configs/smoke.yaml",
                "--model",
                str(model_dir),
                "--output_dir",
                str(tmp_path),
                "--teacher",
                "extractive",
                "--report_to",
                "none",
            ]
        )
        == 0
    )
    split = load_split(tmp_path / "data" / "val.parquet", max_rows=8)
    model, tok = load_causal_lm(str(model_dir)).eval(), tiny_tokenizer
    contexts, positions = split.column("detokenized_text_truncated"), split.column("position")
    own, per_row = reinjection_scores(model, tok, contexts, positions, split.vectors, split.vectors, LAYER)
    assert (
        own["n"] == len(split) and own["kl"] == pytest.approx(0.0, abs=1e-5) and own["recovered"] == pytest.approx(1.0)
    )
    assert own["kl_mean_baseline"] > 1e-3 and own["kl_zero_baseline"] > 1e-3 and own["top1_agree"] == 1.0
    mean = split.vectors.mean(dim=0).expand_as(split.vectors)
    assert reinjection_scores(model, tok, contexts, positions, split.vectors, mean, LAYER)[0][
        "recovered"
    ] == pytest.approx(0.0, abs=1e-5)
    shifted = [p + 1 for p in positions]  # the wrong place: never patched
    left, rows = reinjection_scores(model, tok, contexts, shifted, split.vectors, split.vectors, LAYER)
    assert left["n"] == 0 and left["kl"] is None and rows == [None] * len(split)


@pytest.fixture(scope="module")
def html_report(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    run(
        config(toy, out),
        eval_args(checkpoint=str(toy / "run"), data=str(toy / "data" / "test.parquet"), paraphrase_control=False),
    )
    return out / "report.html"


def test_report_html_is_one_static_page(html_report):
    page = html_report.read_text()
    assert page.count("<tr>") >= 16 and "data:image/png;base64," in page and "Controls" in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # no network, no server


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PROBE = """<script>
(function () {
  const heads = Array.from(document.querySelectorAll('#rows th'));
  const col = heads.findIndex(h => h.textContent === 'FVE');
  const values = () => Array.from(document.querySelectorAll('#rows tbody tr')).map(r => +r.cells[col].dataset.v);
  heads[col].click(); const asc = values();
  heads[col].click(); const desc = values();
  const search = document.getElementById('search');
  search.value = document.querySelector('#rows tbody tr').cells[3].textContent.slice(0, 12);
  search.dispatchEvent(new Event('input'));
  const visible = Array.from(document.querySelectorAll('#rows tbody tr')).filter(r => r.style.display !== 'none').length;
  document.body.setAttribute('data-probe', JSON.stringify({asc, desc, visible, total: asc.length}));
})();
</script></body>"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_report_html_in_a_headless_browser(html_report, tmp_path):
    """Real Chromium: the page loads without console errors, the table sorts both ways, the search
    filters, and a screenshot is taken."""
    import re
    import subprocess

    probe = tmp_path / "probe.html"
    probe.write_text(html_report.read_text().replace("</body>", PROBE, 1))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert "Uncaught" not in dom.stderr and "SyntaxError" not in dom.stderr, dom.stderr[-2000:]
    found = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom.stdout).group(1)))
    assert found["asc"] == sorted(found["asc"]) and found["desc"] == sorted(found["desc"], reverse=True)
    assert found["total"] >= 16 and 1 <= found["visible"] < found["total"]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,1600", html_report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_reinjection_patch_touches_only_the_last_position_at_layer_k(tiny_tokenizer, tmp_path):
    """The cached runs (the tokens before the last run once) give the log-probs of a plain full
    forward whose block-K output is replaced at the last real token only, for rows of different
    lengths and several patches in turn; a mean patch scores exactly the mean baseline."""
    from nla.models.ar import pad_batch
    from nla.models.backbone import decoder_layers
    from nla.models.patching import next_token_logprobs
    from nla.models.sources import load_causal_lm
    from nla.stages.reinjection import reinjection_scores
    from nla.testing import save_tiny_model

    model = load_causal_lm(str(save_tiny_model(tmp_path / "m", initializer_range=0.2))).eval()
    texts = ["a text about a river and a stone", "music", "a stone and a river"]
    ids, mask = pad_batch([tiny_tokenizer(t)["input_ids"] for t in texts], tiny_tokenizer.pad_token_id)
    last = mask.sum(1) - 1

    def plain(patch):  # the whole sequence, no cache: the reference
        def hook(_m, _a, out):
            hidden = (out[0] if isinstance(out, tuple) else out).clone()
            seen.append(hidden[torch.arange(len(texts)), last].clone())
            if patch is not None:
                hidden[torch.arange(len(texts)), last] = patch
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        handle = decoder_layers(model)[LAYER].register_forward_hook(hook)
        try:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            handle.remove()
        return torch.log_softmax(logits[torch.arange(len(texts)), last].float(), -1)

    seen: list = []
    patches = [torch.randn(3, D) * 5, torch.zeros(3, D), torch.randn(3, D)]
    with torch.no_grad():
        original, h, patched = next_token_logprobs(model, ids, mask, LAYER, patches)
        assert torch.allclose(original, plain(None), atol=1e-4) and torch.allclose(h, seen[0], atol=1e-4)
        for patch, got in zip(patches, patched):
            want = plain(patch)
            assert torch.allclose(got, want, atol=1e-4)
            assert (got - original).abs().max() > 1e-3  # the patch did reach the last token

    contexts = ["a text about a river", "a stone and a river", "music about stone"]
    with torch.no_grad():
        vectors = torch.stack(
            [
                next_token_logprobs(
                    model,
                    *(lambda b: (b["input_ids"], b["attention_mask"]))(tiny_tokenizer([c], return_tensors="pt")),
                    LAYER,
                )[1][0]
                for c in contexts
            ]
        )
    mean = vectors.mean(dim=0).expand_as(vectors)
    scores, _ = reinjection_scores(model, tiny_tokenizer, contexts, [None] * 3, vectors, mean, LAYER)
    assert scores["n"] == 3 and scores["kl"] == pytest.approx(scores["kl_mean_baseline"], rel=1e-6)


# ---------------------------------------------------------------- the LLM judge, against a real local server


def rule_judge(body: dict) -> dict:
    """A judge that reads the prompt as a careful one would: a claim is supported when its last word
    occurs in the text, contradicted otherwise."""
    prompt = body["messages"][0]["content"]
    text = prompt.split("<text>", 1)[1].split("</text>", 1)[0]
    description = prompt.split("<description>", 1)[1].split("</description>", 1)[0]
    lines = [
        f"{'SUPPORTED' if c.split()[-1] in text.split() else 'CONTRADICTED'} | {c.strip()}"
        for c in description.split(";")
        if c.strip()
    ]
    return {
        "choices": [{"message": {"role": "assistant", "content": "<verdicts>\n" + "\n".join(lines) + "\n</verdicts>"}}],
        "usage": {"completion_tokens": 5 * len(lines)},
    }


def test_parse_verdicts():
    from nla.data.judge import parse_verdicts

    answer = "Sure.\n<verdicts>\n1. SUPPORTED | ends with a colon\n- contradicted: about lists\nUNCHECKABLE - next a body\n</verdicts>"
    assert parse_verdicts(answer) == [
        {"claim": "ends with a colon", "verdict": "supported"},
        {"claim": "about lists", "verdict": "contradicted"},
        {"claim": "next a body", "verdict": "uncheckable"},
    ]
    assert parse_verdicts("<verdicts>\nno verdict here\n</verdicts>") is None
    assert parse_verdicts("SUPPORTED | no tags") is None


def test_eval_with_an_llm_judge_on_a_real_server(toy, tmp_path, capsys, monkeypatch):
    from nla.testing import TestChatServer

    srv = TestChatServer(rule_judge, api_key="judge-key")
    monkeypatch.setenv("NLA_TEST_JUDGE_KEY", "judge-key")
    try:
        opts = dict(
            judge="openai",
            judge_base_url=srv.url,
            judge_model="rule",
            judge_api_key_env="NLA_TEST_JUDGE_KEY",
            paraphrase_control=False,
            reinjection_rows=0,
        )
        args = eval_args(checkpoint=str(toy / "run"), data=str(toy / "data" / "test.parquet"))
        cfg = config(toy, tmp_path / "out", **{k: v for k, v in opts.items() if k != "paraphrase_control"})
        args.paraphrase_control = False
        judged = run(cfg, args)["claims"]["judged"]
        # each explanation against its own context and, for the chance level, another row's; a prompt asked once
        assert judged["n_judged"] == 16 and 4 < judged["requests_sent"] == srv.requests <= 32
        assert judged["accuracy"] > 0.7 and judged["chance"] < 0.5 and judged["malformed_answers"] == 0, judged
        rows = [json.loads(x) for x in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
        assert all(r["judged"][0]["verdict"] in ("supported", "contradicted") for r in rows if r["explanation"])
        assert "judge supported" in (tmp_path / "out" / "report.md").read_text().replace(
            "(LLM judge) | supported", "judge supported"
        )
        again = run(cfg, args)["claims"]["judged"]  # the cache answers everything: no request sent
        assert (
            again["requests_sent"] == 0
            and srv.requests == judged["requests_sent"]
            and again == {**judged, "requests_sent": 0}
        )
        base = [
            "eval",
            "--config",
            SMOKE,
            "--model",
            str(toy / "model"),
            "--data_dir",
            str(toy / "data"),
            "--checkpoint",
            str(toy / "run"),
            "--output_dir",
            str(tmp_path / "cli"),
            "--judge",
            "openai",
            "--judge_model",
            "rule",
            "--paraphrase_control",
            "false",
            "--reinjection_rows",
            "0",
            "--av_max_new_tokens",
            "24",
        ]
        monkeypatch.setenv("NLA_TEST_JUDGE_KEY", "wrong")
        assert cli(base + ["--judge_base_url", srv.url, "--judge_api_key_env", "NLA_TEST_JUDGE_KEY"]) == 2
        with socket.socket() as s:  # bound then closed: nothing listens there
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        assert cli(base + ["--judge_base_url", dead]) == 2
    finally:
        srv.close()
    errors = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("nla eval")]
    assert len(errors) == 2 and all(e.startswith("nla eval: error:") for e in errors), errors
    assert "judge endpoint" in errors[0] and "HTTP 401" in errors[0] and "--judge_api_key_env" in errors[0]
    assert "judge endpoint" in errors[1] and "unreachable" in errors[1] and "--judge_base_url" in errors[1]


def test_the_report_says_what_rl_was_rewarded_for():
    from nla.stages.report import _reward_line

    grounded = {
        "reward": "neg_mse",
        "claim_reward": 0.5,
        "contrastive_coef": 0.0,
        "length_penalty": 0.0,
        "advantage_norm": "batch",
    }
    line = _reward_line(grounded)[0]
    assert "+ 0.5 x the share of claims checked true" in line and "saw the contexts" in line and "per batch" in line
    plain = _reward_line({**grounded, "claim_reward": 0.0, "advantage_norm": "group"})[0]
    assert "claims" not in plain and plain.startswith("- RL reward: -MSE_nrm from the live AR")
    assert _reward_line(None) == []  # an SFT checkpoint: no RL, no line
