"""What every stage does first: parse the config, seed, save the resolved config where its output goes."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nla.core.config import NLAConfig, parse_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def start_stage(
    argv: list[str],
    stage: str,
    extra: Iterable[type] = (),
    folder: Callable[[NLAConfig, list[Any]], Path] | None = None,
) -> tuple[NLAConfig, list[Any]]:
    """Parse argv, configure the process, and write the resolved `config.yaml` into the folder the
    stage writes its output to: `folder(cfg, extras)` (`<output_dir>/ar` for train-ar, ...), by
    default `<output_dir>/<stage>`."""
    cfg, extras = parse_config(argv, extra)
    seed_everything(cfg.run.seed)
    out = folder(cfg, extras) if folder else cfg.output_dir / stage
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out)
    return cfg, extras
