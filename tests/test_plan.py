"""`nla plan` (nla/stages/plan.py): memory on paper, checked against a real step.

The estimate is compared with the tensor memory a real JointTrainer step holds (bench/run.py's
`memory` part, measured by nla.train.memory.TensorPeak) on tiny models of two architectures, in
float32 and bfloat16, and on the embedded model: each update phase and the whole step within 25%.
The CLI reads a published model's config from a pre-filled HF cache, offline, with no weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bench import _bench

from nla.testing import save_tiny_architecture

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("av", "ar", "step", "step_micro")


def _memory(model_dir: str, dtype: str = "float32", n: int = 4, group: int = 4, tokens: int = 24) -> dict:
    bench = _bench()
    sizes = bench.Sizes.tiny()
    sizes.rl_n, sizes.rl_group, sizes.rl_tokens = n, group, tokens
    return bench.run_all(str(model_dir), dtype, sizes, log=lambda _: None, only=["memory"])


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("gemma3", "float32"), ("llama", "bfloat16")])
def test_the_estimate_is_within_a_quarter_of_a_real_step(arch, dtype, tmp_path):
    out = _memory(save_tiny_architecture(tmp_path / arch, arch), dtype)
    ratios = {k: out[f"memory_estimate_ratio_{k}"] for k in CHECKED}
    assert all(0.75 <= r <= 1.25 for r in ratios.values()), ratios
    assert out["memory_measured_mb_av"] > 2 * out["memory_measured_mb_rollout"]  # a real step, not noise
    assert out["memory_measured_mb_step_micro"] < 0.6 * out["memory_measured_mb_step"]  # micro-batches hold less


def test_the_estimate_is_within_a_quarter_on_the_embedded_model(embedded_model_dir):
    out = _memory(embedded_model_dir, n=2, group=4, tokens=16)
    ratios = {k: out[f"memory_estimate_ratio_{k}"] for k in CHECKED}
    assert all(0.75 <= r <= 1.25 for r in ratios.values()), ratios


def test_weights_and_adapters_are_the_models_own(tmp_path):
    """The parameter count from the meta-device build is the loaded model's, and the LoRA widths give
    peft's adapter size."""
    from nla.models.lora import apply_lora
    from nla.models.sources import load_causal_lm, meta_model
    from nla.stages.plan import arch_of

    for arch in ("llama", "gemma3"):
        folder = save_tiny_architecture(tmp_path / arch, arch)
        a = arch_of(meta_model(str(folder)))
        model = load_causal_lm(str(folder))
        assert a.params == sum(p.numel() for p in model.parameters())
        lora = apply_lora(model, 4)
        assert 4 * sum(a.lora_widths) == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


def test_a_cached_hub_config_is_planned_offline(tmp_path):
    """Qwen2.5-7B by hub id from an HF cache holding its config.json alone: the published parameter
    count, no weights, and the verdict for an 80 GiB GPU: the whole step at once does not fit, the
    config's micro-batch does."""
    snapshot = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "model_configs" / "qwen2.5-7b-instruct" / "config.json", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled"}
    args = ["plan", "--config", "configs/qwen2.5-7b-l20.yaml", "--rl_rollout_engine", "vllm", "--gpu_memory_gb"]
    done = subprocess.run(
        [sys.executable, "-m", "nla.cli", *args, "80", "--rl_micro_batch", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Qwen2ForCausalLM, 7.62B parameters, 28 blocks" in done.stdout  # the published 7.6B
    assert "AV prompt 48 tokens (assumed)" in done.stdout  # no tokenizer in the cache
    assert "vllm engine" in done.stdout and "does NOT fit" in done.stdout
    small = subprocess.run(
        [sys.executable, "-m", "nla.cli", *args, "80"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "micro-batch 8" in small.stdout and "trainer + engine" in small.stdout, small.stdout
    assert ": fits" in small.stdout and "does NOT fit" not in small.stdout, small.stdout


def test_the_update_phases_follow_the_micro_batch(tmp_path):
    """Twice the rollouts, twice the update activations (less the prefix pass, which runs once); a
    micro-batch of the old size brings them back to the old size; the weights stay put."""
    from nla.core.config import NLAConfig
    from nla.models.sources import meta_model
    from nla.stages.plan import arch_of, estimate

    a = arch_of(meta_model(str(save_tiny_architecture(tmp_path / "m", "llama"))))
    cfg = NLAConfig()
    cfg.model.layer = 1
    one = estimate(a, cfg)
    rows = cfg.rl.rl_batch_size * cfg.rl.rl_group_size
    cfg.rl.rl_batch_size *= 2
    two = estimate(a, cfg)
    for phase in ("AV update", "AR update"):
        assert 1.5 * one["phases"][phase] < two["phases"][phase] <= 2 * one["phases"][phase], phase
    cfg.rl.rl_micro_batch = rows
    capped = estimate(a, cfg)
    assert capped["phases"]["AV update"] == one["phases"]["AV update"]
    assert capped["phases"]["AR update"] == one["phases"]["AR update"]
    assert two["trainer"]["weights"] == one["trainer"]["weights"] == a.params * torch.float32.itemsize
