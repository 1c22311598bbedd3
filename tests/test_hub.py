"""A model named by hub id, served offline from a pre-filled Hugging Face cache (the cluster case).

Every stage runs as its own process (HF_HOME and HF_HUB_OFFLINE are read when the hub library is
imported), with the user's HF_HUB_OFFLINE=1 and an endpoint that refuses connections: any network
attempt, or the tool turning offline mode off, shows up in stderr or as a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nla.testing import save_tiny_model

HUB_ID = "tiny-org/tiny-llama"
DEAD_ENDPOINT = "http://127.0.0.1:9"


def fill_hf_cache(hf_home: Path, repo_id: str) -> None:
    """The layout huggingface_hub writes: hub/models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    commit = "0" * 40
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    save_tiny_model(repo / "snapshots" / commit, initializer_range=0.2)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def nla(args: list[str], hf_home: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": DEAD_ENDPOINT,
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "NLA_CACHE": str(tmp / "nla-cache"),
    }
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "nla.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "127.0.0.1" not in proc.stderr, proc.stderr[-3000:]  # no request was even tried
    return proc


def test_every_stage_runs_from_a_hub_id_offline(tmp_path):
    hf_home = tmp_path / "hf"
    fill_hf_cache(hf_home, HUB_ID)
    out = tmp_path / "run"
    common = ["--config", "configs/smoke.yaml", "--model", HUB_ID, "--allow_hub", "true", "--output_dir", str(out)]
    # datagen, train-ar (+ control + oracle), train-av, eval with an oracle AR, rl, eval with an independent AR
    nla(["demo", *common, "--teacher", "extractive", "--eval_max_rows", "8", "--rl_steps", "2"], hf_home, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rl"]["independent_ar"]["path"].endswith("ar/final") and summary["rl"]["oracle"]
    # resuming a finished AR, verbalizing from the checkpoint: both load the LoRA AR's base by hub id
    again = nla(["train-ar", *common], hf_home, tmp_path)
    assert "val fve_nrm" in again.stdout
    said = nla(
        [
            "verbalize",
            *common,
            "--checkpoint",
            str(out / "rl" / "final"),
            "--text",
            "def add(a, b): return a + b",
            "--positions",
            "3,6",
            "--rerank_with_ar",
            "true",
            "--num_samples",
            "2",
            "--out",
            str(tmp_path / "v.jsonl"),
        ],
        hf_home,
        tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert rows and all("mse_nrm" in r for r in rows), said.stdout


def test_a_hub_id_without_allow_hub_is_one_line_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nla.cli",
            "train-ar",
            "--config",
            "configs/smoke.yaml",
            "--model",
            HUB_ID,
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--allow_hub true" in proc.stderr
