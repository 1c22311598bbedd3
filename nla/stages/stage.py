"""What every stage does first: parse the config, seed, save the resolved config."""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np
import torch

from nla.core.config import NLAConfig, parse_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def start_stage(argv: list[str], stage: str, extra: Iterable[type] = ()) -> tuple[NLAConfig, list[Any]]:
    """Parse argv, configure the process, and write `<output_dir>/<stage>/config.yaml`."""
    cfg, extras = parse_config(argv, extra)
    seed_everything(cfg.run.seed)
    out = cfg.output_dir / stage
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out)
    return cfg, extras
