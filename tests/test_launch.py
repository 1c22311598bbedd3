"""Launch files and published-setup configs parse and validate (loading those models needs the hub)."""

from pathlib import Path

import pytest
import yaml

from nla.core.config import parse_config

PUBLISHED = {
    "qwen2.5-7b-l20.yaml": (20, 150.0),
    "gemma-3-12b-l32.yaml": (32, 70000.0),
    "llama-3.3-70b-l53.yaml": (53, 30.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_validate(name):
    cfg, _ = parse_config(["--config", f"configs/{name}"])
    layer, scale = PUBLISHED[name]
    assert cfg.model.layer == layer and cfg.av.injection_scale == scale
    assert cfg.model.allow_hub and cfg.rl.rl_group_size == 8 and cfg.rl.rl_max_new_tokens == 150
    assert "launch" in Path(f"configs/{name}").read_text().splitlines()[1] + Path(f"configs/{name}").read_text()


@pytest.mark.parametrize("path", sorted(Path("launch/accelerate").glob("*.yaml")))
def test_accelerate_yamls_are_valid(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert cfg["num_processes"] >= 1 and cfg["num_machines"] >= 1


def test_slurm_script_passes_arguments_intact(tmp_path):
    """srun/scontrol/accelerate stand-ins record argv: a space stays inside one argument and shell
    text inside an argument is never run."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node-a\necho node-b\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit, run on "this node"
    (bin_dir / "accelerate").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$ARGV_OUT"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    marker = tmp_path / "pwned"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "ARGV_OUT": str(tmp_path / "argv"),
    }
    args = [
        "rl",
        "configs/x.yaml",
        "--output_dir",
        f"runs/a b;touch {marker}",
        "--run_name",
        "$(touch " + str(marker) + ")",
    ]
    subprocess.run(["bash", "launch/slurm.sbatch", *args], env=env, check=True, timeout=30)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert not marker.exists()
    assert argv[argv.index("--output_dir") + 1] == f"runs/a b;touch {marker}"
    assert argv[argv.index("--run_name") + 1] == "$(touch " + str(marker) + ")"
    assert argv[argv.index("--machine_rank") + 1] == "1" and argv[argv.index("--main_process_ip") + 1] == "node-a"
    assert argv[argv.index("--num_processes") + 1] == "16"
    assert argv[argv.index("nla.cli") :] == ["nla.cli", "rl", "--config", "configs/x.yaml", *args[2:]]
