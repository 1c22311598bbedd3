"""Resolve an NLA checkpoint into a loaded AV + AR pair (ours or the public reference release).

    from nla.models.pair import load_nla
    nla = load_nla(checkpoint="runs/demo/rl/final")             # a folder holding av/ and ar/
    nla = load_nla(av="release/av", ar="release/ar")            # reference release: two HF folders
    nla.explain(vectors)        # AV: [n, d] raw -> list[list[Sample]]
    nla.predict(texts)          # AR: explanations -> [n, d]

What `checkpoint` may be (first match wins):
  1. a checkpoint folder holding `av/` and/or `ar/`, each with its `nla_meta.yaml` (`<run>/rl/final`,
     `<run>/av/final`, `<run>/ar/final`);
  2. a run folder (`--output_dir` of the training stages): `rl/final` if RL ran, else the SFT
     outputs `av/final` + `ar/final`;
  3. a single model folder with its sidecar (role av/actor or ar/critic).
`av` / `ar` override the corresponding half. Both loaders verify their sidecar against the live
tokenizer; here we also check the halves belong together (layer, d_model, marker tokens, AR
tokenization), since a mismatched pair runs fine and reports garbage.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from nla.core import templates
from nla.core.config import ConfigError
from nla.core.metrics import target_variance
from nla.core.sidecar import MODEL_META, Meta, SidecarError
from nla.models.ar import AR_ROLES, ARModel, load_ar, mse_scale_of
from nla.models.av import AV_ROLES, Sample, Verbalizer, load_av
from nla.models.backbone import text_config
from nla.models.sources import ModelError, ModelSource, pick_device, role_folder


def option(text: str, default: Any = None) -> Any:
    """A stage-only CLI option (help text + default) for the `extra` dataclasses of verbalize/eval."""
    return field(default=default, metadata={"help": text})


@dataclass
class CheckpointArgs:
    """Which NLA to load (and which model reads text): shared by `nla verbalize` and `nla eval`. A
    single AV or AR folder (ours, or a reference release) is --av_checkpoint / --ar_checkpoint,
    which override the checkpoint's own."""

    checkpoint: str | None = option(
        "NLA checkpoint: a folder holding av/ and ar/ (e.g. <run>/rl/final), or a run folder."
    )
    target_model: str | None = option(
        "Model that extracts activations from text input; unset: the AV sidecar's base_checkpoint."
    )


@dataclass
class CheckpointPaths:
    av: Path | None  # the AV folder itself (holds nla_meta.yaml)
    ar: Path | None  # the AR folder itself


def _role(folder: Path) -> str | None:
    try:
        return (yaml.safe_load((folder / MODEL_META).read_text()) or {}).get("role")
    except (OSError, yaml.YAMLError):
        return None


def _split_checkpoint(root: Path) -> CheckpointPaths:
    """Cases 1-3 of the module docstring; raises ConfigError when none applies."""
    if (root / "av" / MODEL_META).is_file() or (root / "ar" / MODEL_META).is_file():
        for sub in ("av", "ar"):
            if (root / sub).is_dir() and not (root / sub / MODEL_META).is_file():
                raise SidecarError(
                    f"{root / sub / MODEL_META} not found: every NLA checkpoint needs its nla_meta.yaml sidecar."
                )
        return CheckpointPaths(*(root / s if (root / s / MODEL_META).is_file() else None for s in ("av", "ar")))
    if (root / "rl" / "final").is_dir():
        return _split_checkpoint(root / "rl" / "final")
    sft = [root / s / "final" / s for s in ("av", "ar")]
    if any((p / MODEL_META).is_file() for p in sft):
        return CheckpointPaths(*(p if (p / MODEL_META).is_file() else None for p in sft))
    if (root / MODEL_META).is_file():
        role = _role(root)
        if role in AV_ROLES:
            return CheckpointPaths(root, None)
        if role in AR_ROLES:
            return CheckpointPaths(None, root)
        raise SidecarError(f"{root / MODEL_META}: role is {role!r}; expected av/actor or ar/critic.")
    raise ConfigError(
        f"no NLA checkpoint in {root}: expected av/ and ar/ folders with nla_meta.yaml (e.g. <run>/rl/final), "
        "a run folder, or pass --av_checkpoint DIR --ar_checkpoint DIR."
    )


def resolve_paths(
    checkpoint: str | Path | None = None,
    av: str | Path | None = None,
    ar: str | Path | None = None,
    need_ar: bool = True,
) -> CheckpointPaths:
    """The AV and AR folders to load; `av`/`ar` override the halves found in `checkpoint`."""
    for name, value in (("checkpoint", checkpoint), ("av_checkpoint", av), ("ar_checkpoint", ar)):
        if value is not None and not Path(value).exists():
            raise ConfigError(f"--{name} {value}: no such folder.")
    found = _split_checkpoint(Path(checkpoint)) if checkpoint is not None else CheckpointPaths(None, None)
    paths = CheckpointPaths(
        model_folder(av, "av") if av is not None else found.av, model_folder(ar, "ar") if ar is not None else found.ar
    )
    if paths.av is None:
        raise ConfigError(
            f"no AV found{f' in {checkpoint}' if checkpoint else ''}: pass --checkpoint DIR (holding av/) or --av_checkpoint DIR."
        )
    if need_ar and paths.ar is None:
        raise ConfigError(
            f"no AR found{f' in {checkpoint}' if checkpoint else ''}: pass --checkpoint DIR (holding ar/) or --ar_checkpoint DIR."
        )
    return paths


def model_folder(path: str | Path, sub: str) -> Path:
    """A folder holding `<sub>/nla_meta.yaml`, or the model folder itself."""
    path = role_folder(path, sub)
    if not (path / MODEL_META).is_file():
        found = _split_checkpoint(path)  # a run folder or checkpoint given as --av_checkpoint/--ar
        pick = found.av if sub == "av" else found.ar
        if pick is None:
            raise SidecarError(f"{path / MODEL_META} not found: every NLA checkpoint needs its nla_meta.yaml sidecar.")
        return pick
    return path


def check_pair(av_meta: Meta, ar: ARModel, av_tokenizer, ar_tokenizer, where: str = "checkpoint") -> None:
    """Raise a one-line SidecarError unless the AV and AR were made for the same layer, width and tokenizer."""
    ar_meta = ar.meta
    if av_meta.layer_index != ar.layer:
        raise SidecarError(
            f"{where}: the AV explains layer {av_meta.layer_index} but the AR reconstructs layer {ar.layer}; "
            "use an AV and AR trained on the same data."
        )
    av_d = av_meta.d_model or ar.d_model
    if av_d != ar.d_model:
        raise SidecarError(
            f"{where}: the AV has d_model {av_d} but the AR {ar.d_model}; they belong to different models."
        )
    if ar_meta is not None and ar_meta.tokens.ids != av_meta.tokens.ids:
        raise SidecarError(
            f"{where}: the AV and AR sidecars record different marker tokens ({av_meta.tokens.ids} vs "
            f"{ar_meta.tokens.ids}); they were made with different tokenizers or data."
        )
    probe = templates.ar_prompt("a probe: lists, loops and 3.14")
    if av_tokenizer(probe)["input_ids"] != ar_tokenizer(probe)["input_ids"]:
        raise SidecarError(
            f"{where}: the AV and AR tokenizers split text differently; they belong to different base models."
        )


@dataclass
class NLA:
    """A loaded AV (always) and AR (optional), plus the target model M for extraction on demand."""

    verbalizer: Verbalizer
    ar: ARModel | None
    ar_tokenizer: Any
    paths: CheckpointPaths
    target_spec: str | None = None  # overrides the AV sidecar's base_checkpoint for extraction
    source: ModelSource = ModelSource()
    dtype: str = "float32"
    _target: nn.Module | None = field(default=None, repr=False)

    @property
    def meta(self) -> Meta:
        return self.verbalizer.meta

    @property
    def tokenizer(self):
        return self.verbalizer.tokenizer

    @property
    def layer(self) -> int:
        if self.meta.layer_index is None:
            raise SidecarError(
                f"{self.paths.av}: the AV sidecar names no layer (a released AV keeps it on its AR); "
                "pass the AR too (--ar_checkpoint DIR), or give vectors instead of texts."
            )
        return self.meta.layer_index

    @property
    def d_model(self) -> int:
        return self.verbalizer.model.get_input_embeddings().weight.shape[-1]

    @property
    def mse_scale(self) -> float:
        return mse_scale_of(self.ar) if self.ar is not None else math.sqrt(self.d_model)

    def variance(self, vectors: torch.Tensor) -> tuple[float | None, str]:
        """(Var for strict FVE, where it came from): `strict_variance` for this pair's AR."""
        return strict_variance(self.ar, vectors, self.mse_scale)

    def explain(
        self,
        vectors: torch.Tensor,
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        batch_size: int | None = None,
    ) -> list[list[Sample]]:
        """vectors [n, d] raw -> n lists of `num_samples` Samples (`batch_size` sequences per generate call)."""
        return self.verbalizer.verbalize(
            vectors.to(self.verbalizer.device), num_samples, temperature, max_new_tokens, batch_size
        )

    def predict(self, texts: list[str], ar: ARModel | None = None, tokenizer=None) -> torch.Tensor:
        """Explanations -> [n, d] fp32 on the CPU (None/failed texts read as '')."""
        ar = ar or self.ar
        if ar is None:
            raise ConfigError("this needs an AR: pass --checkpoint DIR holding ar/, or --ar_checkpoint DIR.")
        return ar.predict([t or "" for t in texts], tokenizer or self.ar_tokenizer)

    @contextlib.contextmanager
    def target_model(self) -> Iterator[nn.Module]:
        """The target LM M: the AV with its LoRA adapter switched off, or (full-weight AV) the base model loaded once."""
        model = self.verbalizer.model
        if hasattr(model, "disable_adapter") and self.target_spec is None:
            with model.disable_adapter():
                yield model
            return
        if self._target is None:
            self._target = self._load_target()
        yield self._target

    def _load_target(self) -> nn.Module:
        spec = self.target_spec or self.meta.base_model
        if not spec:
            raise SidecarError(
                f"{self.paths.av}: the sidecar names no base_checkpoint; pass --target_model DIR to extract activations."
            )
        try:
            path = self.source.resolve(spec)
        except ModelError as err:  # a hub id from a released sidecar, hub off: say how to point at a local copy
            raise ConfigError(
                f"target model {spec!r} for activation extraction: {err} (or pass --target_model DIR)."
            ) from None
        model = self.source.causal_lm(path, self.dtype).to(self.verbalizer.device).eval()
        text = text_config(model.config)
        n_layers, width = text.num_hidden_layers, text.hidden_size
        if width != self.d_model or self.layer >= n_layers:
            raise SidecarError(
                f"target model {spec}: hidden_size {width}, {n_layers} blocks, but the AV needs d_model "
                f"{self.d_model} and block {self.layer}; pass the matching --target_model."
            )
        return model


def strict_variance(ar: ARModel | None, vectors: torch.Tensor, scale: float) -> tuple[float | None, str]:
    """(Var for strict FVE, where it came from): the Var the AR was trained against when its sidecar
    records it, else these vectors' own (at least two), else (None, "none"). The one choice of Var
    for eval, its extra ARs, verbalize and RL's reward."""
    var = (ar.meta.extra if ar is not None and ar.meta else {}).get("ar_target_variance")
    if var:
        return float(var), "ar_sidecar (the AR's training targets)"
    if len(vectors) >= 2:
        return target_variance(vectors, scale), "these_vectors (the AR sidecar records none)"
    return None, "none"


def load_nla(
    checkpoint: str | Path | None = None,
    av: str | Path | None = None,
    ar: str | Path | None = None,
    *,
    need_ar: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    max_new_tokens: int = 64,
    target_model: str | None = None,
    source: ModelSource = ModelSource(),
) -> NLA:
    """Load the AV (and the AR when there is one, or when `need_ar`) and check they belong together."""
    paths = resolve_paths(checkpoint, av, ar, need_ar)
    verbalizer = load_av(paths.av, device=device, dtype=dtype, max_new_tokens=max_new_tokens, source=source)
    ar_model, ar_tok = (None, None)
    if paths.ar is not None:
        ar_model, ar_tok = load_checked_ar(paths.ar, verbalizer, str(paths.av), device, dtype, source)
    return NLA(verbalizer, ar_model, ar_tok, paths, target_model, source, dtype)


def load_from_config(cfg, checkpoint: str | None, need_ar: bool, target_model: str | None = None) -> NLA:
    """`load_nla` for a stage: `--av_checkpoint`/`--ar_checkpoint` override the checkpoint's AV/AR,
    and with no checkpoint at all the run folder `--output_dir` is searched (rl/final, else the SFT
    finals)."""
    av, ar = cfg.av.av_checkpoint, cfg.ar.ar_checkpoint
    if checkpoint is None and av is None:
        if not cfg.output_dir.is_dir():
            raise ConfigError(
                f"no checkpoint given and --output_dir {cfg.output_dir} does not exist: "
                "pass --checkpoint DIR, or --av_checkpoint DIR [--ar_checkpoint DIR]."
            )
        checkpoint = cfg.output_dir
    return load_nla(
        checkpoint,
        av,
        ar,
        need_ar=need_ar,
        device=cfg.run.device,
        dtype=cfg.model.dtype,
        max_new_tokens=cfg.av.av_max_new_tokens,
        target_model=target_model,
        source=ModelSource.of(cfg.model),
    )


def load_checked_ar(
    path: str | Path,
    verbalizer: Verbalizer,
    av_where: str = "AV",
    device: str = "auto",
    dtype: str = "float32",
    source: ModelSource = ModelSource(),
) -> tuple[ARModel, Any]:
    """An AR (ours or reference; a folder or a checkpoint holding ar/) checked against a loaded AV."""
    folder = model_folder(path, "ar")
    ar_model, ar_tok = load_ar(folder, device=pick_device(device), dtype=dtype, source=source)
    if verbalizer.meta.layer_index is None:  # the release format records the layer on the AR only
        verbalizer.meta.layer_index = ar_model.layer
    check_pair(verbalizer.meta, ar_model, verbalizer.tokenizer, ar_tok, where=f"AV {av_where} + AR {folder}")
    return ar_model, ar_tok
