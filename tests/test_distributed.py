"""Every training stage under 2 gloo processes on CPU: ranks agree, N x B == 1 x N*B, crash-safe resume, N -> M.

The multi-process runs use the documented CPU recipe (torchrun/accelerate + OMP_NUM_THREADS=1;
`make_accelerator` builds `Accelerator(cpu=True)`, without which each process would silently train
alone). Per-rank weights come from `tests/dist_worker.py`, which runs a stage like `nla.cli` does and
then dumps that rank's trainable tensors. The 1-process references run in this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_rl import _cfg, _toy_splits  # the RL toy: 4 colour words, vectors around 4 centres

from nla.core.config import parse_config
from nla.stages import rl, train_ar, train_av
from nla.train.checkpoint import resolve_resume

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def adapter(folder: Path, name: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def same_across_ranks(dump: Path) -> dict[str, torch.Tensor]:
    """Rank 0's and rank 1's trainable tensors are bit-identical; returns rank 0's."""
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert r0.keys() == r1.keys() and len(r0) > 0
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differ, f"ranks hold different weights: {differ[:3]}"
    return r0


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer):
    """One tiny wide-init model + av_sft/ar_sft/rl/val splits shared by every test here."""
    from nla.testing import save_tiny_model

    root = tmp_path_factory.mktemp("dist-toy")
    model = save_tiny_model(root / "model", initializer_range=0.2)
    _toy_splits(root / "data", model, tiny_tokenizer)
    return root


def av_args(toy: Path, out: Path, batch: int, *extra: str) -> list[str]:
    # grad_accum 2: accumulation and sharding together; av_sft responses differ in token count per rank.
    return [
        "--config",
        "configs/smoke.yaml",
        "--model",
        str(toy / "model"),
        "--data_dir",
        str(toy / "data"),
        "--output_dir",
        str(out),
        "--resume",
        "auto",
        "--av_steps",
        "4",
        "--av_batch_size",
        str(batch),
        "--av_grad_accum",
        "2",
        "--av_save_every",
        "2",
        "--av_eval_every",
        "4",
        "--av_lora_r",
        "4",
        "--av_lr",
        "3e-3",
        "--av_max_new_tokens",
        "8",
        *extra,
    ]


@pytest.fixture(scope="module")
def av_two(toy, tmp_path_factory):
    """train-av, 2 processes x batch 4 (global 8 rows x 2 micro-batches a step), 4 steps."""
    root = tmp_path_factory.mktemp("av-two")
    proc = launch(TORCHRUN + [WORKER, str(root / "dump"), "train-av", *av_args(toy, root / "run", 4)])
    assert proc.stdout.count("[dist_worker] run 0 (train-av) done on rank") == 2
    return root


@pytest.fixture(scope="module")
def av_one(toy, tmp_path_factory):
    """The same run on 1 process x batch 8 (in this process)."""
    out = tmp_path_factory.mktemp("av-one")
    cfg, _ = parse_config(av_args(toy, out, 8))
    train_av.run(cfg)
    return out


def test_train_av_ranks_hold_identical_weights(av_two):
    ranks = same_across_ranks(av_two / "dump" / "0")
    saved = adapter(av_two / "run" / "av" / "final" / "av")  # written by rank 0 only
    lora_b = [k for k in ranks if "lora_B" in k]
    assert lora_b and max(float(ranks[k].abs().max()) for k in lora_b) > 1e-3  # it trained (B starts at 0)
    assert len(saved) == len(ranks)
    assert all(torch.equal(ranks[k.replace(".weight", ".default.weight")], saved[k]) for k in saved)
    assert not list((av_two / "run" / "av").glob(".*.tmp"))  # no leftover partial checkpoint folders


def test_train_av_two_processes_equal_one_process_double_batch(av_two, av_one):
    """2 x B == 1 x 2B: the same global rows per step and the loss normalised over the global step.

    Before the loss was normalised by the token count of the whole global step (not each rank's),
    this differed by 3e-3 on this toy, 1000x the tolerance: the check can fail.
    """
    two, one = adapter(av_two / "run" / "av" / "final" / "av"), adapter(av_one / "av" / "final" / "av")
    assert max_diff(two, one) < 2e-5


def test_checkpoint_from_two_processes_resumes_on_one(toy, av_two, av_one, tmp_path):
    """N -> M: the step-2 checkpoint written by 2 processes, resumed by 1 process with batch 2B."""
    root = tmp_path / "run" / "av"
    root.mkdir(parents=True)
    shutil.copytree(av_two / "run" / "av" / "checkpoint-000002", root / "checkpoint-000002")
    cfg, _ = parse_config(av_args(toy, tmp_path / "run", 8))
    out = train_av.run(cfg)
    assert out["resumed_from_step"] == 2
    resumed = adapter(root / "final" / "av")
    assert max_diff(resumed, adapter(av_one / "av" / "final" / "av")) < 2e-5
    assert max_diff(resumed, adapter(av_two / "run" / "av" / "final" / "av")) < 2e-5


# ---------------------------------------------------------------------------------------- rl


@pytest.fixture(scope="module")
def warm(toy):
    """SFT AV (answer format) and SFT AR (word -> centre), trained once in this process."""
    cfg = _cfg(toy, toy / "model", "--data_dir", toy / "data", "--resume", "never")
    train_ar.run(cfg)
    assert train_av.run(cfg)["extraction_fail_rate"] < 0.5
    return toy


def rl_args(warm: Path, out: Path, batch: int, temperature: float) -> list[str]:
    return [
        "--config",
        "configs/smoke.yaml",
        "--model",
        str(warm / "model"),
        "--data_dir",
        str(warm / "data"),
        "--av_checkpoint",
        str(warm / "av" / "final"),
        "--ar_checkpoint",
        str(warm / "ar" / "final"),
        "--output_dir",
        str(out),
        "--resume",
        "never",
        "--layer",
        "1",
        "--rl_steps",
        "2",
        "--rl_batch_size",
        str(batch),
        "--rl_group_size",
        "4",
        "--rl_max_new_tokens",
        "28",
        "--rl_av_lr",
        "5e-3",
        "--rl_ar_lr",
        "1e-3",
        "--rl_kl_coef",
        "0.1",
        "--rl_save_every",
        "2",
        "--rl_table_every",
        "0",
        "--rl_temperature",
        str(temperature),
    ]


@pytest.fixture(scope="module")
def rl_two(warm, tmp_path_factory):
    """Two RL runs in one 2-process launch: sampled (T=1) and greedy (T=0), batch 2 per process."""
    root = tmp_path_factory.mktemp("rl-two")
    launch(
        TORCHRUN
        + [
            WORKER,
            str(root / "dump"),
            "rl",
            *rl_args(warm, root / "sampled", 2, 1.0),
            "::",
            "rl",
            *rl_args(warm, root / "greedy", 2, 0.0),
        ]
    )
    return root


def test_rl_adapters_identical_across_ranks(rl_two, warm):
    """Sampled rollouts differ per rank (own vectors); the all-reduced av and ar grads keep ranks equal."""
    ranks = same_across_ranks(rl_two / "dump" / "0")
    sft_av = adapter(warm / "av" / "final" / "av")
    moved = max(float((ranks[k.replace(".weight", ".av.weight")] - sft_av[k]).abs().max()) for k in sft_av)
    assert moved > 1e-3  # the AV policy really was updated
    assert any(".ar." in k for k in ranks) and "ar_head.weight" in ranks
    same_across_ranks(rl_two / "dump" / "1")
    assert (rl_two / "sampled" / "rl" / "final" / "av" / "adapter_model.safetensors").is_file()


def test_rl_two_processes_equal_one_process_double_batch(rl_two, warm, tmp_path):
    """Greedy rollouts make the rows' explanations independent of the rank split, so 2 x B == 1 x 2B.

    Sampled rollouts cannot match: generate draws from one RNG stream per process, and the draws a
    row gets depend on which rows share its batch. Greedy groups have zero advantage, so this checks
    the AR half of the step (its grads averaged by `grpo.sync_gradients`); the AV half is covered by
    the per-rank identity above.
    """
    cfg, _ = parse_config(rl_args(warm, tmp_path / "one", 4, 0.0))
    rl.run(cfg)
    half, _ = parse_config(rl_args(warm, tmp_path / "half", 2, 0.0))
    rl.run(half)  # control: 1 process x B sees half the rows and must land elsewhere
    two, one, other = (p / "rl" / "final" for p in (rl_two / "greedy", tmp_path / "one", tmp_path / "half"))
    for sub, name in (
        ("ar", "adapter_model.safetensors"),
        ("ar", "value_head.safetensors"),
        ("av", "adapter_model.safetensors"),
    ):
        assert max_diff(adapter(two / sub, name), adapter(one / sub, name)) < 1e-4, (sub, name)
    assert max_diff(adapter(two / "ar"), adapter(other / "ar")) > 1e-3
    sft_ar = adapter(warm / "ar" / "final" / "ar")
    assert max_diff(adapter(one / "ar"), sft_ar) > 1e-3  # the AR did train, so equality means something


# ------------------------------------------------------------------------------ crash safety


def test_sigkill_mid_training_resumes_to_the_same_weights(toy, tmp_path):
    """2-process train-ar killed (SIGKILL, whole process group) after checkpoint 4, rerun with the
    same command (`--resume auto`): ends where an uninterrupted run ends."""
    out = tmp_path / "run"
    args = [
        "--config",
        "configs/smoke.yaml",
        "--model",
        str(toy / "model"),
        "--data_dir",
        str(toy / "data"),
        "--ar_steps",
        "30",
        "--ar_save_every",
        "2",
        "--ar_eval_every",
        "1000",
        "--ar_lr",
        "5e-3",
        "--ar_lora_r",
        "4",
    ]
    cmd = TORCHRUN + ["-m", "nla.cli", "train-ar", *args, "--ar_batch_size", "4", "--output_dir", str(out)]
    log = open(tmp_path / "killed.log", "w")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    ready, deadline = out / "ar" / "checkpoint-000004" / "trainer_state.json", time.time() + 240
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert ready.exists(), (tmp_path / "killed.log").read_text()[-2000:]
    assert not (out / "ar" / "final").exists(), "the run finished before the kill; raise --ar_steps"
    killed_at = resolve_resume("auto", out / "ar")
    at_kill = adapter(killed_at / "ar")  # read now: the resumed run prunes old checkpoints (keep 2)
    # A torn folder without trainer_state.json (a non-atomic writer's leftover) must be ignored.
    (out / "ar" / "checkpoint-000999").mkdir()
    (out / "ar" / "checkpoint-000999" / "junk.bin").write_bytes(b"\0" * 16)
    assert resolve_resume("auto", out / "ar") == killed_at
    launch(cmd)
    state = (out / "ar" / "final" / "trainer_state.json").read_text()
    assert '"step": 30' in state
    cfg, _ = parse_config(
        args
        + [
            "--ar_batch_size",
            "8",
            "--output_dir",
            str(tmp_path / "straight"),
            "--resume",
            "never",
            "--ar_save_every",
            "1000",
        ]
    )
    train_ar.run(cfg)  # uninterrupted, 1 process x 2B (== 2 x B, see the train-av test)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        resumed, straight = (
            adapter(out / "ar" / "final" / "ar", name),
            adapter(tmp_path / "straight" / "ar" / "final" / "ar", name),
        )
        assert max_diff(resumed, straight) < 1e-4, name
    # Control: where the killed run stopped is far (>> tolerance) from where training ends.
    assert max_diff(adapter(out / "ar" / "final" / "ar"), at_kill) > 1e-2
