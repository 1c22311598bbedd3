"""Joint RL under 2 gloo processes with the vllm rollout engine: one engine per process.

Each rank starts its own engine (on CPU bound to its own core), samples its own rows, and syncs its
own copy after every update (here `--rl_engine_sync adapter`, the mode meant for GPUs). Checked:
both engines ran (a worker log per rank), the engine's log-probs match the trainer's at every step
(`rl/engine_k3` ~ 0), the ranks hold identical adapters after the run, and a run killed (SIGKILL,
whole process group) after a checkpoint and rerun with the same command ends where an uninterrupted
run ends. Marker vllm: `make test` runs it with the vLLM environment; skipped without one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_distributed import ENV, REPO, TORCHRUN, WORKER, adapter, launch, max_diff, rl_args, same_across_ranks
from test_rl import _cfg, _toy_splits

from nla.stages import train_ar, train_av
from nla.testing import save_tiny_model

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]
STEPS = 4


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tiny_tokenizer):
    """The RL toy on a tiny model vLLM's CPU kernels take (head size 32), with its SFT pair."""
    root = tmp_path_factory.mktemp("vllm-dist")
    model = save_tiny_model(root / "model", initializer_range=0.2, n_heads=2)
    _toy_splits(root / "data", model, tiny_tokenizer)
    cfg = _cfg(root, model, "--data_dir", root / "data", "--resume", "never")
    train_ar.run(cfg)
    train_av.run(cfg)
    return root


def vllm_args(warm: Path, out: Path, vllm_python: str) -> list[str]:
    args = rl_args(warm, out, 2, 1.0)
    args[args.index("--rl_steps") + 1] = str(STEPS)
    args[args.index("--resume") + 1] = "auto"
    return args + [
        "--rl_rollout_engine",
        "vllm",
        "--rl_engine_sync",
        "adapter",
        "--rl_vllm_python",
        vllm_python,
        "--rl_vllm_memory_gb",
        "0.25",
        "--rl_val_rows",
        "0",
    ]


@pytest.fixture(scope="module")
def straight(warm, vllm_python, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-straight")
    launch(TORCHRUN + [WORKER, str(root / "dump"), "rl", *vllm_args(warm, root / "run", vllm_python)], timeout=600)
    return root


def test_each_rank_samples_with_its_own_engine_and_ranks_agree(straight, warm):
    run = straight / "run"
    cores = []
    for rank in (0, 1):  # each rank's engine on its own share of the cores
        line = next(
            x for x in (run / f"vllm_worker_{rank}.log").read_text().splitlines() if "nla vllm worker: cores" in x
        )
        cores.append(set(json.loads(line.split("cores ", 1)[1])))
    assert all(cores) and not cores[0] & cores[1], cores
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "rl/engine_k3" in s]
    assert len(steps) == STEPS, steps
    assert all(abs(s["rl/engine_k3"]) < 1e-3 for s in steps), [s["rl/engine_k3"] for s in steps]
    assert all(0 < s["rl/sync_bytes"] < 1e6 for s in steps)  # the adapter alone
    ranks = same_across_ranks(straight / "dump" / "0")
    sft_av = adapter(warm / "av" / "final" / "av")
    moved = max(float((ranks[k.replace(".weight", ".av.weight")] - sft_av[k]).abs().max()) for k in sft_av)
    assert moved > 1e-3  # the AV was updated, so the engines had new adapters to take


def test_a_killed_run_resumes_to_the_same_weights(straight, warm, vllm_python, tmp_path):
    out = tmp_path / "run"
    cmd = TORCHRUN + ["-m", "nla.cli", "rl", *vllm_args(warm, out, vllm_python)]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    ready, deadline = out / "rl" / "checkpoint-000002" / "trainer_state.json", time.time() + 400
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert ready.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert not (out / "rl" / "final").exists(), "the run finished before the kill"
    launch(cmd, timeout=600)
    for sub, name in (("av", "adapter_model.safetensors"), ("ar", "adapter_model.safetensors")):
        resumed = adapter(out / "rl" / "final" / sub, name)
        assert max_diff(resumed, adapter(straight / "run" / "rl" / "final" / sub, name)) < 1e-4, sub
