"""`kill -9` in the middle of writing a checkpoint, for every stage that writes one (datagen's
extraction chunks, train-ar, train-av, rl; train-ar under 2 processes is in test_distributed.py): the same
command rerun cleans up the torn write, resumes from the last complete checkpoint and ends exactly
where an uninterrupted run ends.

The kill is aimed at the write itself: the run is watched until a temporary checkpoint folder (or
chunk file) appears, after at least one complete one exists, and its process group gets SIGKILL at
once. A write can finish between the sighting and the kill, so each test retries until a kill lands
with the temporary entry still on disk, and asserts that one did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_datagen import SMOKE, all_rows
from test_rl import _cfg, _toy_splits  # the RL toy: 4 colour words, vectors around 4 centres

from nla.core.config import parse_config
from nla.stages import rl, train_ar, train_av
from nla.stages.datagen import run as datagen_run

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
TRIES = 6


def kill_during_write(
    cmd: list[str], torn: Callable[[], list[Path]], ready: Callable[[], bool], log: Path, timeout: float = 240
) -> bool | None:
    """Run `cmd`; SIGKILL its process group as soon as `ready()` and `torn()` is non-empty.
    Returns True when a torn entry was still on disk after the kill, False when the write had
    finished first, None when the run ended before any kill."""
    with open(log, "a") as out:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline:
            if ready() and torn():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return bool(torn())
            time.sleep(0.0002)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{cmd[3]} never wrote a checkpoint within {timeout}s: {log.read_text()[-2000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    return None


def kill_then_finish(cmd: list[str], torn: Callable[[], list[Path]], ready: Callable[[], bool], log: Path) -> None:
    """Kill mid-write (retrying the same command until one kill lands inside a write), then rerun
    the same command to the end; no torn entry may survive the finished run."""
    landed = False
    for _ in range(TRIES):
        hit = kill_during_write(cmd, torn, ready, log)
        if hit is None:  # this attempt ran to the end: the remaining checkpoints were too few
            break
        landed |= hit
        if landed:
            break
    assert landed, f"no kill landed inside a write in {TRIES} tries: {log.read_text()[-2000:]}"
    finish = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert not torn(), torn()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {
        f"{f.parent.name}/{f.name}:{k}": v
        for f in sorted(folder.rglob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


def complete(root: Path, at_least: int) -> bool:
    return len(list(root.glob("checkpoint-*/trainer_state.json"))) >= at_least


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_model_dir, tiny_tokenizer):
    """The RL toy's data and a 2-step SFT pair (the starting point of the RL kill test)."""
    root = tmp_path_factory.mktemp("kill-toy")
    _toy_splits(root / "data", toy_model_dir, tiny_tokenizer)
    cfg = _cfg(
        root, toy_model_dir, "--ar_steps", "2", "--av_steps", "2", "--ar_save_every", "2", "--av_save_every", "2"
    )
    train_ar.run(cfg)
    train_av.run(cfg)
    return root


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    from nla.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("kill-model"), initializer_range=0.2)


def stage_args(toy: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/smoke.yaml",
        "--model",
        str(model_dir),
        "--data_dir",
        str(toy / "data"),
        "--output_dir",
        str(out),
        "--layer",
        "1",
        "--report_to",
        "none",
        *extra,
    ]


# stage -> (its checkpoint folder, its save-interval key, its arguments; {av}/{ar} = the toy's SFT pair)
STAGES = {
    "train-ar": (
        "ar",
        "ar_save_every",
        ["--ar_steps", "12", "--ar_eval_every", "1000", "--ar_batch_size", "4", "--ar_lr", "5e-3", "--ar_lora_r", "4"],
    ),
    "train-av": (
        "av",
        "av_save_every",
        ["--av_steps", "12", "--av_eval_every", "1000", "--av_batch_size", "4", "--av_lr", "3e-3", "--av_lora_r", "4"],
    ),
    "rl": (
        "rl",
        "rl_save_every",
        [
            "--av_checkpoint",
            "{av}",
            "--ar_checkpoint",
            "{ar}",
            "--rl_steps",
            "8",
            "--rl_batch_size",
            "2",
            "--rl_group_size",
            "2",
            "--rl_max_new_tokens",
            "8",
            "--rl_val_rows",
            "0",
            "--rl_temperature",
            "1.0",
        ],
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_killed_mid_checkpoint_resumes_to_the_same_weights(stage, toy, toy_model_dir, tmp_path):
    folder, save_key, args = STAGES[stage]
    extra = [a.format(av=toy / "av" / "final", ar=toy / "ar" / "final") for a in args]
    root = tmp_path / "killed" / folder
    cmd = [
        sys.executable,
        "-m",
        "nla.cli",
        stage,
        *stage_args(toy, toy_model_dir, tmp_path / "killed", *extra, f"--{save_key}", "1"),
    ]
    kill_then_finish(cmd, lambda: list(root.glob(".checkpoint-*.tmp")), lambda: complete(root, 2), tmp_path / "log")
    cfg, _ = parse_config(stage_args(toy, toy_model_dir, tmp_path / "straight", *extra, f"--{save_key}", "1000"))
    {"train-ar": train_ar.run, "train-av": train_av.run, "rl": rl.run}[stage](cfg)
    assert_same_weights(root / "final", tmp_path / "straight" / folder / "final")


def test_datagen_killed_mid_chunk_resumes_to_the_same_data(tmp_path):
    """300 documents = 5 extraction chunks; killed while writing one after the first is on disk
    (a wider tiny model, so that a chunk takes long enough to write to be caught)."""
    from nla.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", d_model=512)

    def args(out: Path) -> list[str]:
        return [
            "--config",
            SMOKE,
            "--model",
            str(model_dir),
            "--output_dir",
            str(out),
            "--teacher",
            "extractive",
            "--corpus",
            "builtin:python-docs",
            "--max_docs",
            "300",
            "--positions_per_doc",
            "8",
        ]

    work = tmp_path / "killed" / "data" / ".work"
    cmd = [sys.executable, "-m", "nla.cli", "datagen", *args(tmp_path / "killed")]
    kill_then_finish(
        cmd,
        lambda: list(work.glob(".*.tmp")) if work.is_dir() else [],
        lambda: work.is_dir() and any(work.glob("extract-*.parquet")),
        tmp_path / "log",
    )
    cfg, _ = parse_config(args(tmp_path / "straight"))
    datagen_run(cfg)
    killed, straight = all_rows(tmp_path / "killed" / "data"), all_rows(tmp_path / "straight" / "data")
    assert [r[:3] for r in killed] == [r[:3] for r in straight] and len(killed) > 1000
    assert all(torch.equal(a[3], b[3]) for a, b in zip(killed, straight))
