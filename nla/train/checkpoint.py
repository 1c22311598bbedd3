"""Checkpoints written atomically, found again for `--resume auto`.

Layout: `<root>/checkpoint-<step:06d>/` holding whatever the trainer writes (adapters, heads as
safetensors, `nla_meta.yaml`), plus `training_state.pt` (optimizer, scheduler, RNG; loaded with
`weights_only=True`; optimizers and schedulers as `<role>_optimizer` / `<role>_scheduler`, role av or
ar) and `trainer_state.json` (step, data cursor in rows, layout, ...). The folder is built under
a temporary name and renamed, and `trainer_state.json` is written last, so a folder that exists
with that file is complete. `<root>/final` is the last one, copied under a stable name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nla.core.config import ALIASES, ConfigError, NLAConfig
from nla.core.io import atomic_dir, atomic_write_text, write_errors

STATE_FILE = "trainer_state.json"
# Version of what a checkpoint holds: 2 = the cursor counts rows of `loop.row_stream` and optimizers
# are saved as <role>_optimizer. Older checkpoints read other rows on resume, so they are refused.
LAYOUT = 2
_CKPT = re.compile(r"^checkpoint-(\d+)$")


# Keys a resumed run may change: how long it runs and how it reports, not what it trains.
# Keys added after checkpoints were written, with the value those checkpoints trained with: a resume
# compares a checkpoint that predates the key as if it had saved this value.
IMPLIED_BY_OLDER_CHECKPOINTS = {
    "rl_top_k": 50,  # transformers' generate applied top-50 before top_k was an option
    "rl_claim_quote_chars": 0,  # every true quote paid in full
}
_MAY_CHANGE_ON_RESUME = re.compile(
    r"(_steps|_every|_val_rows)$|^(av_max_new_tokens|output_dir|resume|device|av_eval_at_start|rl_rollout_engine|rl_vllm_python|"
    r"rl_vllm_memory_gb|rl_engine_sync|rl_micro_batch)$"
)


def training_fingerprint(cfg: NLAConfig, *sections: str, processes: int = 1, **extra: Any) -> dict[str, Any]:
    """What a checkpoint was trained with: the model, the seed, every key of `sections` (e.g. "ar")
    except run length and reporting, and `extra` (e.g. the dataset id). A resume compares it.
    Batch sizes count all `processes` (a run may resume on another process count, same global batch)."""
    out: dict[str, Any] = {
        "model": cfg.model.model,
        "layer": cfg.model.layer,
        "dtype": cfg.model.dtype,
        "seed": cfg.run.seed,
    }
    for name in sections:
        for k, v in dataclasses.asdict(getattr(cfg, name)).items():
            if k.endswith("_batch_size"):
                out[f"{k} x processes"] = v * processes
            elif not _MAY_CHANGE_ON_RESUME.search(k):
                out[k] = v
    return {**out, **extra}


def save_checkpoint(
    root: str | Path,
    step: int,
    write: Callable[[Path], None],
    state: dict[str, Any],
    optimizers: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """`write(tmp_dir)` writes model files; we add training state and RNG, then rename into place."""
    root = Path(root)
    target = root / f"checkpoint-{step:06d}"
    with atomic_dir(target) as tmp, write_errors(target):
        write(tmp)
        torch.save(
            {
                "optimizers": {k: v.state_dict() for k, v in (optimizers or {}).items()},
                "torch_rng": torch.get_rng_state(),
            },
            tmp / "training_state.pt",
        )
        extra = {"python_rng": _jsonable(random.getstate()), "numpy_rng": _jsonable(np.random.get_state())}
        atomic_write_text(
            tmp / STATE_FILE, json.dumps({"step": step, "layout": LAYOUT, **state, "rng": extra}, indent=2)
        )
    for old in sorted(list_checkpoints(root))[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


class Saver:
    """The one checkpoint callback every trainer's `fit` calls: `saver(step, loop_state)` writes
    `<root>/checkpoint-<step>` on the main process (`write(tmp_dir, step)` puts the models in, the
    trainer's optimizers and `loop_state` plus the fixed `state` go beside them) with every process
    in step around it; `last` is the newest checkpoint (a resumed one until the first save)."""

    def __init__(
        self,
        root: str | Path,
        write: Callable[[Path, int], None],
        optimizers: Callable[[], dict[str, Any]],
        state: dict[str, Any],
        accelerator=None,
        last: Path | None = None,
    ):
        self.root, self.write, self.optimizers, self.state = Path(root), write, optimizers, state
        self.acc, self.last = accelerator, last

    def __call__(self, step: int, loop_state: dict[str, Any]) -> None:
        self._barrier()
        if self.acc is None or self.acc.is_main_process:
            write = self.write
            save_checkpoint(self.root, step, lambda d: write(d, step), {**loop_state, **self.state}, self.optimizers())
        self.last = self.root / f"checkpoint-{step:06d}"  # on every process: all know a save happened
        self._barrier()

    def _barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CKPT.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def unreadable(path: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be resumed from (None: it can). Cheap: parses the
    state JSON and opens the training-state archive's index, which a cut-off write lacks."""
    try:
        json.loads((path / STATE_FILE).read_text())
        with zipfile.ZipFile(path / "training_state.pt"):
            pass
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return f"{type(err).__name__}: {err}"
    return None


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """'never'/'restart' -> None; 'auto' -> the newest readable checkpoint (falling back past
    unreadable ones, with a note on stderr) or None; else the given path."""
    if resume in ("never", "restart"):
        return None
    if resume == "auto":
        for path in reversed(list_checkpoints(root)):
            problem = unreadable(path)
            if problem is None:
                return path
            print(f"[resume] {path} cannot be read ({problem}); trying the one before it", file=sys.stderr)
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(
            f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-N folder, "
            "'auto' or 'never'."
        )
    return path


def start_from(resume: str, root: str | Path, fingerprint: dict[str, Any], is_main: bool = True) -> Path | None:
    """Where a stage starts: the checkpoint to resume (checked against this run's config), or None.

    Removes temporary folders that dead writers left; refuses `never` where checkpoints exist
    (a new run would mix with and prune them) and moves them aside for `restart`."""
    root = Path(root)
    if is_main:
        remove_stale_temps(root)
    existing = list_checkpoints(root)
    if resume == "never" and existing:
        raise ConfigError(
            f"{root} already holds checkpoints up to step {_step(existing[-1])} from an earlier run; "
            "continue it with --resume auto, start over with --resume restart (moves them aside), "
            "or use another --output_dir."
        )
    if resume == "restart" and existing and is_main:
        aside = root / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.mkdir(parents=True)
        for path in [*existing, root / "final"]:
            if path.exists():
                os.replace(path, aside / path.name)
        print(f"[resume] --resume restart: moved {len(existing)} checkpoint(s) to {aside}", file=sys.stderr)
    path = resolve_resume(resume, root)
    if path is None:
        return None
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("layout") != LAYOUT:
        raise ConfigError(
            f"{path} predates this version's checkpoint layout {LAYOUT} (its data order and optimizer "
            "names differ); start over with --resume restart, or finish it with the nla version that wrote it."
        )
    saved = state.get("fingerprint")
    if saved is not None:  # a checkpoint written before an option was renamed saved its old name
        saved = {ALIASES.get(k, k): v for k, v in saved.items()}
        saved = {**{k: v for k, v in IMPLIED_BY_OLDER_CHECKPOINTS.items() if k in fingerprint}, **saved}
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if changed:
            diffs = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {fingerprint.get(k)!r})" for k in changed[:6])
            raise ConfigError(
                f"{path} was trained with other settings: {diffs}; put them back to continue it, or "
                "start over with --resume restart (or another --output_dir)."
            )
    print(f"[resume] resuming from {path} (step {state.get('step')})", file=sys.stderr)
    return path


def remove_stale_temps(root: Path) -> None:
    """Delete `.checkpoint-*.tmp` / `.final.*.tmp` folders left by a writer that was killed."""
    if root.is_dir():
        for tmp in root.glob(".*.tmp"):
            if tmp.is_dir() and (tmp.name.startswith(".checkpoint-") or tmp.name.startswith(".final.")):
                shutil.rmtree(tmp, ignore_errors=True)


def _step(path: Path) -> int:
    return int(_CKPT.match(path.name).group(1))


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
