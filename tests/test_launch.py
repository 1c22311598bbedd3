"""Launch files and published-setup configs parse and validate (loading those models needs the hub)."""

from pathlib import Path

import pytest
import yaml

from nla.config import parse_config

PUBLISHED = {"qwen2.5-7b-l20.yaml": (20, 150.0), "gemma-3-12b-l32.yaml": (32, 70000.0), "llama-3.3-70b-l53.yaml": (53, 30.0)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_validate(name):
    cfg, _ = parse_config(["--config", f"configs/{name}"])
    layer, scale = PUBLISHED[name]
    assert cfg.model.layer == layer and cfg.av.injection_scale == scale
    assert cfg.model.allow_hub and cfg.rl.group_size == 8 and cfg.rl.max_response_tokens == 150
    assert "launch" in Path(f"configs/{name}").read_text().splitlines()[1] + Path(f"configs/{name}").read_text()


@pytest.mark.parametrize("path", sorted(Path("launch/accelerate").glob("*.yaml")))
def test_accelerate_yamls_are_valid(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert cfg["num_processes"] >= 1 and cfg["num_machines"] >= 1
