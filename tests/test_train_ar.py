"""`nla train-ar` on a tiny learnable task: it learns, the controls do not, resume is exact."""

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nla.core.config import ConfigError, from_flat_dict
from nla.core.metrics import fve_nrm
from nla.core.sidecar import Meta, make_token_spec
from nla.core.templates import ar_prompt
from nla.data.splits import derangement, write_split
from nla.models.ar import build_ar, load_ar
from nla.stages.train_ar import main, run, run_shuffled_control
from nla.testing import nan_gradients_once
from nla.train.ar_sft import ARRows, ARTrainer

WORDS = ["apple", "river", "engine", "purple", "violin", "castle"]
SMOKE = "configs/smoke.yaml"


def write_task(data_dir, tok, model_dir, n_train=96, n_val=24, seed=0):
    """Explanation = one of 6 words; its target = the word's fixed random vector + small noise."""
    g = torch.Generator().manual_seed(seed)
    protos = 3 * torch.randn(len(WORDS), 64, generator=g) + torch.randn(64, generator=g)  # shared offset: anisotropy
    meta = Meta(
        "nla_dataset",
        make_token_spec(tok, "㈠"),
        d_model=64,
        layer_index=1,
        base_model=str(model_dir),
        extra={"suggested_injection_scale": 3.0, "dataset_id": "words6"},
    )
    for name, n, offset in (("ar_sft", n_train, 0), ("val", n_val, 1)):
        which = [(i + offset) % len(WORDS) for i in range(n)]
        vectors = protos[which] + 0.3 * torch.randn(n, 64, generator=g)
        texts = [f"{WORDS[w]}" for w in which]
        cols = {
            "explanation": texts,
            "prompt": [ar_prompt(t) for t in texts],
            "doc_id": [f"{name}-{i}" for i in range(n)],
        }
        write_split(data_dir / f"{name}.parquet", vectors, cols, meta)


def make_cfg(tmp_path, model_dir, **over):
    flat = yaml.safe_load(open(SMOKE))
    flat.update(
        model=str(model_dir),
        output_dir=str(tmp_path / "run"),
        data_dir=str(tmp_path / "data"),
        resume="never",
        ar_steps=60,
        ar_lr=5e-3,
        ar_batch_size=8,
        ar_lora_r=8,
        ar_eval_every=30,
        ar_save_every=30,
        log_every=5,
    )
    flat.update(over)
    return from_flat_dict(flat)


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    root = tmp_path_factory.mktemp("ar-task")
    write_task(root / "data", tiny_tokenizer, tiny_model_dir)
    return root


def test_derangement_moves_every_row():
    perm = derangement(7, seed=1)
    assert sorted(perm.tolist()) == list(range(7)) and (perm != torch.arange(7)).all()


def test_learns_and_controls_stay_at_chance(task, tiny_model_dir, tmp_path):
    cfg = make_cfg(task, tiny_model_dir, output_dir=str(tmp_path / "run"))
    real = run(cfg)
    control = run_shuffled_control(cfg)
    assert real["val_fve_nrm"] > 0.5, real
    assert real["controls"]["empty_text"] <= 0.02 and real["controls"]["random_text"] < 0.1
    assert real["controls"]["word_salad"] < 0.3 and control["val_fve_nrm"] <= 0.1, (real, control)
    assert real["val_fve_vs_mean_pred"] >= real["val_fve_nrm"]
    losses = [
        r["ar/loss"]
        for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
        if r["stage"] == "train-ar" and "ar/loss" in r
    ]
    assert losses[-1] < 0.5 * losses[0]
    # The published checkpoint carries the training Var and scale; reloaded, it scores the same.
    ar, tok = load_ar(real["checkpoint"])
    extra = ar.meta.extra
    assert extra["role"] == "ar" and extra["extraction"] == {"mse_scale": 8.0, "injection_scale": 3.0}
    assert extra["control"] is None and extra["training"]["dataset_id"] == "words6"
    val = load_split_rows(task / "data" / "val.parquet")
    fve = fve_nrm(ar.predict(val[0], tok), val[1], 8.0, var=extra["ar_target_variance"])
    assert fve == pytest.approx(real["val_fve_nrm"], abs=1e-4)
    assert (tmp_path / "run" / "ar_shuffled_targets" / "final" / "ar").is_dir()  # never in <output_dir>/ar


def load_split_rows(path):
    from nla.data.splits import load_split

    split = load_split(path)
    return split.column("explanation"), split.vectors


def test_resume_is_exact(task, tiny_model_dir, tmp_path):
    cfg = make_cfg(
        task,
        tiny_model_dir,
        output_dir=str(tmp_path / "run"),
        ar_steps=8,
        ar_save_every=4,
        ar_eval_every=100,
        ar_grad_accum=2,
        resume="auto",
    )
    straight = run(cfg)
    root = tmp_path / "run" / "ar"
    shutil.copytree(root / "final", tmp_path / "straight")
    shutil.rmtree(root / "checkpoint-000008")
    shutil.rmtree(root / "final")
    resumed = run(cfg)  # picks up checkpoint-000004
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    entries = [(e["step"], tuple(sorted(k for k in e if k != "time"))) for e in logged if e["stage"] == "train-ar"]
    assert len(entries) == len(set(entries)) and max(e[0] for e in entries) == 8  # steps 5..8 not logged twice
    assert resumed["steps"] == straight["steps"] == 8
    state = json.loads((root / "final" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["cursor"] == 128 and state["layout"] == 2  # rows: 8 steps x 2 micro-batches x 8
    for name in ("value_head.safetensors", "adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / "ar" / name)), load_file(str(root / "final" / "ar" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError, match="already holds checkpoints up to step 8.*--resume restart"):
        run(cfg.replace(resume="never", ar_steps=4))  # would mix with (and prune) the earlier run's checkpoints
    with pytest.raises(ConfigError, match=r"other settings: ar_lr \(checkpoint 0\.0.*now 0\.5\).*--resume restart"):
        run(cfg.replace(ar_lr=0.5))  # finished run, changed lr: refused, not silently kept
    assert run(cfg.replace(ar_steps=10))["steps"] == 10  # run length may change: continues from step 8
    fresh = run(cfg.replace(resume="restart", ar_steps=4))  # moves the old run aside, starts over
    assert (
        fresh["steps"] == 4
        and sorted(p.name for p in root.glob("superseded-*/checkpoint-*"))[-1] == "checkpoint-000010"
    )
    assert json.loads((root / "final" / "trainer_state.json").read_text())["step"] == 4


def test_resume_falls_back_past_a_cut_checkpoint_and_clears_dead_temps(task, tiny_model_dir, tmp_path, capsys):
    from nla.train.checkpoint import list_checkpoints

    cfg = make_cfg(
        task,
        tiny_model_dir,
        output_dir=str(tmp_path / "run"),
        ar_steps=8,
        ar_save_every=4,
        ar_eval_every=100,
        resume="auto",
    )
    run(cfg)
    root = tmp_path / "run" / "ar"
    state = root / "checkpoint-000008" / "training_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a write cut off by kill -9
    (root / ".checkpoint-000012.abc123.tmp").mkdir()  # what a killed writer leaves
    run(cfg.replace(ar_steps=12))
    err = capsys.readouterr().err
    assert "checkpoint-000008 cannot be read" in err and "resuming from" in err and "checkpoint-000004 (step 4)" in err
    assert not list(root.glob(".*.tmp")) and list_checkpoints(root)[-1].name == "checkpoint-000012"


def test_non_finite_steps_are_skipped(tiny_model_dir, tiny_tokenizer, tmp_path):
    from accelerate import Accelerator

    cfg = make_cfg(tmp_path, tiny_model_dir, ar_steps=3, report_to="none")
    ar = build_ar(str(tiny_model_dir), 1, lora_r=4)
    ids = ar.token_ids(WORDS, tiny_tokenizer)
    rows = ARRows(ids, torch.randn(len(ids), 64), list(WORDS))
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(ar.trainable_parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = ARTrainer(
        cfg.ar,
        cfg.run.seed,
        ar,
        ar,
        tiny_tokenizer,
        rows,
        rows,
        acc,
        opt,
        sched,
        {},
    )
    nan_gradients_once(trainer.stepper, ar.trainable_parameters())
    head0 = ar.head.weight.detach().clone()
    trainer.train_step(0)
    assert trainer.skipped == 1 and torch.equal(ar.head.weight, head0)
    trainer.train_step(1)
    assert trainer.skipped == 1 and not torch.equal(ar.head.weight, head0) and torch.isfinite(ar.head.weight).all()


def test_main_prints_the_table(task, tiny_model_dir, tmp_path, capsys):
    argv = [
        "--config",
        SMOKE,
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path / "run"),
        "--data_dir",
        str(task / "data"),
        "--ar_steps",
        "2",
        "--shuffled_control",
        "true",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for row in ("real explanations", "empty text", "other rows' explanations", "word salad", "shuffled-target control"):
        assert row in out
    assert math.isfinite(float(out.split("real explanations")[1].split()[0]))


@pytest.mark.distributed
def test_two_process_ddp_on_cpu(task, tiny_model_dir, tmp_path):
    """2 gloo processes, batch 4 each (global 8): trains, only rank 0 writes, the sidecar records 2 processes."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "launch/accelerate/cpu_2proc.yaml",
        "-m",
        "nla.cli",
        "train-ar",
        "--config",
        SMOKE,
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path / "run"),
        "--data_dir",
        str(task / "data"),
        "--ar_steps",
        "60",
        "--ar_lr",
        "5e-3",
        "--ar_batch_size",
        "4",
        "--ar_lora_r",
        "8",
        "--ar_eval_every",
        "30",
        "--ar_save_every",
        "30",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fve = float(proc.stdout.split("real explanations")[1].split()[0])
    side = yaml.safe_load((tmp_path / "run" / "ar" / "final" / "ar" / "nla_meta.yaml").read_text())
    assert side["training"]["num_processes"] == 2 and fve > 0.5
    assert proc.stdout.count("[train-ar]") == 1  # one summary: only the main process prints


def test_oracle_ar_reads_the_raw_context_tail(tiny_model_dir, tiny_tokenizer, tmp_path):
    """--ar_text context: the AR reads the context's last characters (verbatim, trailing newline kept)
    instead of the explanation. Here only the context names the word, so only the oracle learns."""
    from nla.core.templates import ORACLE_CONTEXT_CHARS, context_tail
    from nla.data.splits import load_split
    from nla.train.ar_sft import ar_texts

    write_task(tmp_path / "data", tiny_tokenizer, tiny_model_dir)
    for name in ("ar_sft", "val"):  # move the word from the explanation into the context
        split = load_split(tmp_path / "data" / f"{name}.parquet")
        words = split.column("explanation")
        cols = {
            **split.columns,
            "explanation": ["a text"] * len(words),
            "prompt": [ar_prompt("a text")] * len(words),
            "detokenized_text_truncated": [f"Some text, and then the word {w}\n" for w in words],
        }
        write_split(split.path, split.vectors, cols, split.meta)
    split = load_split(tmp_path / "data" / "val.parquet")
    tails = ar_texts(split, "context")
    assert tails[0] == f"Some text, and then the word {WORDS[1]}\n"
    assert context_tail("x" * 500 + "end\n") == ("x" * 500 + "end\n")[-ORACLE_CONTEXT_CHARS:]
    assert ar_prompt(tails[0]).endswith(f"{WORDS[1]}\n</text> <summary>")  # the trailing newline reaches the AR
    assert context_tail("abc", 0) == "" and ar_texts(split, "explanation")[0] == "a text"

    cfg = make_cfg(tmp_path, tiny_model_dir, ar_eval_every=100)
    oracle = run(cfg.replace(ar_text="context"))
    plain = run(cfg)
    assert oracle["val_fve_nrm"] > 0.5 and plain["val_fve_nrm"] < 0.1, (oracle, plain)
    assert (tmp_path / "run" / "ar_oracle" / "final" / "ar").is_dir()  # never <output_dir>/ar
    ar, _ = load_ar(oracle["checkpoint"])
    assert ar.meta.extra["ar_text"] == "context"
