"""Checkpoints written atomically, found again for `--resume auto`.

Layout: `<root>/checkpoint-<step:06d>/` holding whatever the trainer writes (adapters, heads as
safetensors, `nla_meta.yaml`), plus `training_state.pt` (optimizer, scheduler, RNG; loaded with
`weights_only=True`) and `trainer_state.json` (step, data cursor, ...). The folder is built under
a temporary name and renamed, and `trainer_state.json` is written last, so a folder that exists
with that file is complete. `<root>/final` is the last one, copied under a stable name.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nla.io import atomic_dir, atomic_write_text

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], state: dict[str, Any],
                    optimizers: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """`write(tmp_dir)` writes model files; we add training state and RNG, then rename into place."""
    root = Path(root)
    target = root / f"checkpoint-{step:06d}"
    with atomic_dir(target) as tmp:
        write(tmp)
        torch.save({"optimizers": {k: v.state_dict() for k, v in (optimizers or {}).items()},
                    "torch_rng": torch.get_rng_state()}, tmp / "training_state.pt")
        extra = {"python_rng": _jsonable(random.getstate()), "numpy_rng": _jsonable(np.random.get_state())}
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, **state, "rng": extra}, indent=2))
    for old in sorted(list_checkpoints(root))[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CKPT.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """'never' -> None; 'auto' -> newest complete checkpoint or None; else the given path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}).")
    return path


def load_checkpoint_state(path: str | Path, optimizers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore optimizers and RNG from `path`; return trainer_state.json's contents."""
    path = Path(path)
    blob = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(blob["optimizers"][name])
    torch.set_rng_state(blob["torch_rng"])
    state = json.loads((path / STATE_FILE).read_text())
    rng = state.pop("rng", {})
    if "python_rng" in rng:
        v, internal, g = rng["python_rng"]
        random.setstate((v, tuple(internal), g))
    if "numpy_rng" in rng:
        name, keys, pos, has_gauss, gauss = rng["numpy_rng"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    return state


def publish_final(checkpoint: str | Path, root: str | Path) -> Path:
    """Copy a checkpoint to `<root>/final` atomically (the stable name later stages read)."""
    with atomic_dir(Path(root) / "final") as tmp:
        shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
    return Path(root) / "final"


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x
