"""`nla train-av` end to end on a tiny model: a task only a vector-reading AV can learn, resume, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nla.core import templates
from nla.core.config import ConfigError, from_flat_dict, load_yaml
from nla.core.sidecar import Meta, SidecarError, make_token_spec
from nla.data.splits import load_split, write_split
from nla.models.av import load_av
from nla.stages import train_av
from nla.testing import save_tiny_model

MARKER = "㈠"
D = 64
WORDS = ["apple", "river", "music", "stone"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer):
    """A wide-init tiny model + datasets where the response names the centre a vector was drawn around."""
    root = tmp_path_factory.mktemp("toy")
    tok = tiny_tokenizer
    # init std 0.2: at HF's 0.02 a tiny model's text barely depends on the prompt at all.
    save_tiny_model(root / "model", d_model=D, seed=0, initializer_range=0.2)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(len(WORDS), D, generator=g) * 3
    for name, n in (("av_sft", 256), ("val", 32)):
        label = torch.randint(0, len(WORDS), (n,), generator=g)
        vectors = centres[label] + torch.randn(n, D, generator=g)
        columns = {
            "prompt": [templates.av_user_message(MARKER)] * n,
            "response": [templates.av_response(WORDS[i]) for i in label],
            "explanation": [WORDS[i] for i in label],
            "detokenized_text_truncated": [f"text about {WORDS[i]}" for i in label],
        }
        write_split(root / "data" / f"{name}.parquet", vectors, columns, meta(tok))
    return root


def meta(tok, d_model=D, scale=8.0):
    extra = {"suggested_injection_scale": scale} if scale else {}
    return Meta(
        kind="nla_dataset",
        tokens=make_token_spec(tok, MARKER),
        d_model=d_model,
        layer_index=1,
        base_model="tiny",
        extra=extra,
    )


def config(toy, out, **overrides):
    values = {
        **load_yaml("configs/smoke.yaml"),
        "model": str(toy / "model"),
        "data_dir": str(toy / "data"),
        "output_dir": str(out),
        "av_lora_r": 8,
        "av_max_new_tokens": 24,
        **overrides,
    }
    return from_flat_dict(values)


def test_learns_a_task_that_needs_the_vector(toy, tmp_path):
    cfg = config(toy, tmp_path / "run", av_steps=60, av_batch_size=16, av_lr=1e-2, av_eval_every=30, av_save_every=60)
    out = train_av.run(cfg)
    # Before training, real and shuffled vectors are equally (un)informative: the control is unbiased.
    assert abs(out["shuffle_gap_start"]) < 0.05
    assert out["val_loss"] < 0.1 * out["val_loss_start"]
    # The one informative token per row costs far more with another row's vector.
    assert out["shuffle_gap"] > 0.08, out
    assert out["non_latin_rate"] == 0.0 and out["extraction_fail_rate"] < 0.5
    assert len(out["samples"]) == 3 and all(len(s) == 3 for s in out["samples"])
    av = load_av(out["checkpoint"], device="cpu", max_new_tokens=24)
    val = load_split(toy / "data" / "val.parquet")
    said = [s[0].explanation for s in av.verbalize(val.vectors, temperature=0.0)]
    right = sum(a == b for a, b in zip(said, val.column("explanation")))
    assert right >= 0.75 * len(val), list(zip(said, val.column("explanation")))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert {
        "av/loss",
        "av/lr",
        "av/tokens_per_s",
        "av/val_loss",
        "av/val_loss_shuffled",
        "av/shuffle_gap",
        "av/non_latin_rate",
        "av/extraction_fail_rate",
    } <= keys
    tables = (tmp_path / "run" / "tables.jsonl").read_text()
    assert '"av/samples"' in tables and "context_tail" in tables


def test_resume_continues_exactly(toy, tmp_path, capsys):
    """4 steps straight == 2 steps, resume from that checkpoint, 2 more (grad accumulation on)."""
    args = [
        "--config",
        "configs/smoke.yaml",
        "--model",
        str(toy / "model"),
        "--data_dir",
        str(toy / "data"),
        "--output_dir",
        str(tmp_path / "run"),
        "--av_steps",
        "4",
        "--av_save_every",
        "2",
        "--av_eval_every",
        "4",
        "--av_batch_size",
        "4",
        "--av_grad_accum",
        "2",
        "--av_lr",
        "3e-3",
        "--av_lora_r",
        "4",
    ]
    assert train_av.main(args) == 0
    printed = capsys.readouterr().out
    assert "val loss real" in printed and "shuffled" in printed and printed.count("teacher:") == 3
    # describe() copes with what non-main processes / resumed runs leave empty.
    assert "val loss real -" in train_av.describe({"steps": 0, "wall_s": 0, "samples": [], "checkpoint": None})
    root = tmp_path / "run" / "av"
    straight = load_file(root / "final" / "av" / "adapter_model.safetensors")
    shutil.rmtree(root / "checkpoint-000004")
    shutil.rmtree(root / "final")
    out = train_av.main(args + ["--resume", "auto"])
    assert out == 0
    state = json.loads((root / "final" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["cursor"] == 32 and state["layout"] == 2  # rows: 4 steps x 4 x 2 micro-batches
    resumed = load_file(root / "final" / "av" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-5, rtol=1e-4)
    # Control: a run from scratch with another seed ends elsewhere, so the comparison can fail.
    other = train_av.run(
        config(
            toy,
            tmp_path / "other",
            av_steps=4,
            av_batch_size=4,
            av_grad_accum=2,
            av_lr=3e-3,
            av_lora_r=4,
            seed=1,
            av_eval_at_start=False,
        )
    )
    diff = load_file(f"{other['checkpoint']}/av/adapter_model.safetensors")
    assert max((diff[k] - straight[k]).abs().max() for k in straight) > 1e-3
    logged = [json.loads(line) for line in (tmp_path / "other" / "metrics.jsonl").read_text().splitlines()]
    assert other["shuffle_gap_start"] is None and other["shuffle_gap"] is not None  # no check before the first step
    assert 0 not in [e["step"] for e in logged if "av/shuffle_gap" in e] and logged[-1]["step"] == 4


def test_a_non_finite_gradient_skips_that_update(toy, tmp_path, tiny_tokenizer):
    """Fault injection on the real gradients of one step (as a bf16 overflow would produce): that update
    is skipped and counted, the next one applies."""
    from accelerate import Accelerator

    from nla.core.tracking import Tracker
    from nla.models.av import make_av_meta
    from nla.models.lora import trainable_parameters
    from nla.testing import nan_gradients_once
    from nla.train.av_sft import AVTrainer
    from nla.train.loop import schedule

    cfg = config(toy, tmp_path / "run", av_batch_size=4, report_to="none")
    model = train_av.build_model(cfg, str(toy / "model"), None)
    data = train_av.load_data(cfg, tiny_tokenizer, D)
    av_meta = make_av_meta(data.train.meta, D, cfg.model.model, data.injection_scale, cfg.av.av_lora_r, {})
    acc = Accelerator(cpu=True)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = schedule(optimizer, 4)
    model, optimizer = acc.prepare(model, optimizer)
    trainer = AVTrainer(
        cfg.av,
        0,
        acc,
        model,
        tiny_tokenizer,
        av_meta,
        data,
        optimizer,
        scheduler,
        Tracker(cfg, "t", True),
    )
    nan_gradients_once(trainer.stepper, params)
    before = [p.detach().clone() for p in params]
    trainer.train_step(0)
    assert trainer.stepper.skipped == 1 and all(torch.equal(x, y) for x, y in zip(before, params))
    trainer.train_step(1)
    assert trainer.stepper.skipped == 1 and any(not torch.equal(x, y) for x, y in zip(before, params))
    assert all(torch.isfinite(p).all() for p in params)


def test_derangement_moves_every_row():
    from nla.data.splits import derangement

    perm = derangement(9, 0)
    assert sorted(perm.tolist()) == list(range(9)) and (perm != torch.arange(9)).all()


def _broken(toy, tmp_path, tok, **kw):
    data = tmp_path / "data"
    shutil.copytree(toy / "data", data)
    split = load_split(data / "av_sft.parquet")
    columns = dict(split.columns)
    if kw.get("prompt"):
        columns["prompt"] = [kw["prompt"]] * len(split)
    write_split(
        data / "av_sft.parquet",
        split.vectors[:, : kw.get("d", D)],
        columns,
        meta(tok, d_model=kw.get("d", D), scale=kw.get("scale", 8.0)),
    )
    return data


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("no_scale", ConfigError, "injection scale"),
        ("d_model", SidecarError, "hidden_size"),
        ("template", SidecarError, "template drift"),  # the one error type the CLI prints as one line
    ],
)
def test_bad_data_fails_with_one_line(toy, tmp_path, tiny_tokenizer, kind, error, message):
    kw = {"no_scale": {"scale": None}, "d_model": {"d": 32}, "template": {"prompt": "Describe ㈠ please."}}[kind]
    data = _broken(toy, tmp_path, tiny_tokenizer, **kw)
    cfg = config(toy, tmp_path / "run", data_dir=str(data))
    with pytest.raises(error) as err:
        train_av.run(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
