"""The activation reconstructor (AR): explanation text -> predicted residual activation of block K.

The AR is the target LM truncated to blocks 0..K (the *config* is truncated before loading, so
blocks K+1.. never take memory), its final norm replaced by the identity, no LM head, plus a
`Linear(d, d, bias=False)` head initialised to the identity. It reads the plain-string AR prompt
(`templates.ar_prompt`, `add_special_tokens=True` so BOS stays where the tokenizer adds one) and
the prediction is the head output at the last real token (padding-side agnostic).

`ARModel(backbone, layer, head)` reads block K through `backbone.block_output` (early exit), so
the same class runs on a truncated backbone (block K is its last block) and on a full base model
shared with the AV during joint RL (`attach_to_shared_base`).

On disk (`<checkpoint>/ar/`): the PEFT adapter (LoRA) or the full truncated weights (an HF model
folder with K+1 layers, i.e. the public reference release format), `value_head.safetensors` (one
tensor `weight` [d, d]), the tokenizer, and the model sidecar `nla_meta.yaml` (role ar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from nla.core import templates
from nla.core.sidecar import MODEL_META, Meta, SidecarError, read_meta, write_meta
from nla.models.backbone import block_output, decoder_layers, last_token_index, text_config
from nla.models.sources import (
    ModelError,
    ModelSource,
    damaged,
    load_adapter,
    load_truncated_backbone,
    role_folder,
    saved_lora_config,
    unreadable_weights,
)

# Longer AR prompts are flagged (`over_length`): SFT drops them, RL gives them the failure reward.
AR_MAX_TOKENS = 256
HEAD_FILE = "value_head.safetensors"
AR_ROLES = ("ar", "critic")  # a sidecar's role for an AR; "critic": older reference sidecars
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class ARInputs:
    input_ids: torch.Tensor  # [b, seq] (long), right-padded
    attention_mask: torch.Tensor  # [b, seq]
    over_length: torch.Tensor  # [b] bool: the prompt had more than max_length tokens (truncated here)


def pad_batch(id_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists. -> (input_ids [b, seq], attention_mask [b, seq])."""
    width = max(1, max((len(x) for x in id_lists), default=1))
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for i, row in enumerate(id_lists):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def identity_head(d_model: int) -> nn.Linear:
    """Identity init: the read-out starts as the raw block-K state (default init started worse)."""
    head = nn.Linear(d_model, d_model, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(d_model))
    return head


class ARModel(nn.Module):
    """Backbone (truncated or shared) + block-K read-out at the last real token + linear head.

    The head is kept in fp32 whatever the backbone dtype: it is small and the regression target
    is a direction, where bf16 rounding in the last matmul is pure noise.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer: int,
        head: nn.Linear,
        template: str = templates.AR_TEMPLATE,
        max_length: int = AR_MAX_TOKENS,
        meta: Meta | None = None,
    ):
        super().__init__()
        self.backbone, self.layer, self.head = backbone, layer, head.float()
        self.template, self.max_length, self.meta = template, max_length, meta

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def d_model(self) -> int:
        return self.head.weight.shape[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[b, seq] ids + mask -> [b, d] prediction (fp32)."""
        hidden = block_output(self.backbone, input_ids, attention_mask, self.layer)  # [b, seq, d]
        last = last_token_index(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [b, d]
        return self.head(picked.float())

    def token_ids(self, texts: list[str], tokenizer) -> list[list[int]]:
        """Untruncated AR prompt ids for each explanation (one tokenization, special tokens kept)."""
        prompts = [templates.ar_prompt(t or "", self.template) for t in texts]
        return tokenizer(prompts, add_special_tokens=True)["input_ids"]

    def encode(self, texts: list[str], tokenizer) -> ARInputs:
        """Explanations -> padded AR inputs on the AR's device; over-length prompts are cut and flagged."""
        return self.pad_ids(self.token_ids(texts, tokenizer), tokenizer)

    def pad_ids(self, ids: list[list[int]], tokenizer) -> ARInputs:
        """`token_ids` rows -> padded AR inputs on the AR's device; over-length prompts are cut and flagged."""
        over = torch.tensor([len(x) > self.max_length for x in ids], dtype=torch.bool)
        input_ids, mask = pad_batch([x[: self.max_length] for x in ids], tokenizer.pad_token_id)
        return ARInputs(input_ids.to(self.device), mask.to(self.device), over)

    @torch.no_grad()
    def predict(self, texts: list[str], tokenizer, batch_size: int = 32) -> torch.Tensor:
        """Explanations -> [n, d] fp32 predictions on the CPU (no grad, batched, eval mode).

        Batches are cut from the texts sorted by token length, so a batch pads to its own longest
        text instead of the longest of a random mix; rows come back in the given order."""
        was_training = self.training
        self.eval()
        ids = self.token_ids(texts, tokenizer)  # once: the lengths to sort by and the batches' rows
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        out = torch.zeros(len(texts), self.d_model)
        try:
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = self.pad_ids([ids[i] for i in rows], tokenizer)
                out[rows] = self(batch.input_ids, batch.attention_mask).float().cpu()
        finally:
            self.train(was_training)
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_ar(
    model_path: str,
    layer: int,
    lora_r: int,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    template: str = templates.AR_TEMPLATE,
    trust_remote_code: bool = False,
) -> ARModel:
    """A fresh AR on blocks 0..layer of `model_path`: LoRA on every block (r > 0) or full fine-tuning.

    LoRA covers blocks 0..K, which here are all the blocks (the truncated backbone has no others),
    so no layer filter is passed (peft's default layer regex would not even match a base model's
    top-level `layers.N` names without `layers_pattern`).
    """
    from nla.models.lora import apply_lora

    backbone = load_truncated_backbone(model_path, layer, dtype, trust_remote_code)
    backbone = apply_lora(backbone, lora_r)
    ar = ARModel(backbone, layer, identity_head(text_config(backbone.config).hidden_size), template)
    return ar.to(device)


def save_ar(ar: ARModel, directory: str | Path, meta: Meta, tokenizer=None) -> Path:
    """Write the AR folder: adapter or full weights, value head, tokenizer, sidecar (written last)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ar.backbone.save_pretrained(directory)  # PEFT: adapter only; plain: HF folder with K+1 layers
    save_file({"weight": ar.head.weight.detach().float().cpu().contiguous()}, str(directory / HEAD_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_meta(directory / MODEL_META, meta)
    return directory


def model_meta(ar: ARModel, base: Meta, base_checkpoint: str, mse_scale: float, extra: dict[str, Any]) -> Meta:
    """The AR's model sidecar: tokens/templates from the dataset sidecar, role ar, scales, provenance.

    Its `injection_scale` is the dataset's suggestion, for information only: the AR never injects
    (the AV's sidecar holds the scale it uses); the reference format has the field.
    """
    lora = getattr(getattr(ar.backbone, "peft_config", {}).get("default"), "r", 0)
    injection = base.extra.get("suggested_injection_scale")
    return Meta(
        kind="nla_model",
        tokens=base.tokens,
        av_template=base.av_template,
        ar_template=ar.template,
        d_model=ar.d_model,
        layer_index=ar.layer,
        base_model=base_checkpoint,
        extra={
            "role": "ar",
            "stage": "sl",
            "ar_max_tokens": ar.max_length,
            "lora": {"r": int(lora)},
            "extraction": {
                "mse_scale": float(mse_scale),
                "injection_scale": None if injection is None else float(injection),
            },
            **extra,
        },
    )


def read_ar_meta(directory: Path) -> Meta:
    meta = read_meta(directory)  # raises "... not found: needs its nla_meta.yaml"
    raw = yaml.safe_load((directory / MODEL_META).read_text()) or {}
    where = str(directory / MODEL_META)
    if meta.kind != "nla_model":
        raise SidecarError(f"{where}: kind is {meta.kind!r}, not nla_model; point at an AR checkpoint, not a dataset.")
    role = meta.extra.get("role", "ar")
    if role not in AR_ROLES:
        raise SidecarError(
            f"{where}: role is {role!r}; this is not an AR checkpoint (pass the AR folder, e.g. <run>/ar/final)."
        )
    if "num_hidden_layers" not in (raw.get("ar") or {}) and "extraction_layer_index" not in (raw.get("critic") or {}):
        raise SidecarError(
            f"{where}: no layer index (ar.num_hidden_layers or critic.extraction_layer_index); add the block index K."
        )
    return meta


def load_ar(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    trainable: bool = False,
    base_model: str | None = None,
    source: ModelSource = ModelSource(),
) -> tuple[ARModel, Any]:
    """Load an AR checkpoint (ours or the reference release format) -> (ARModel, tokenizer).

    `path`: a checkpoint folder holding `ar/`, or the AR folder itself. LoRA folders need the base
    model (the sidecar's `base_checkpoint`, or `base_model` to override it), found through `source`
    (the stage's hub/cache/trust options); full-weight folders are self-contained. Verifies the
    sidecar against the live tokenizer, d_model, and K+1 blocks.
    """
    from safetensors.torch import load_file

    directory = role_folder(path, "ar")
    if not directory.is_dir():
        raise ModelError(f"AR checkpoint {directory} not found; train one with `nla train-ar` or pass --ar_checkpoint.")
    meta = read_ar_meta(directory)
    layer = meta.layer_index
    is_lora = (directory / "adapter_config.json").is_file()
    if is_lora:
        base = source.resolve(base_model or meta.base_model)
        backbone = load_truncated_backbone(base, layer, dtype, source.trust_remote_code)
    elif (directory / "config.json").is_file():
        backbone = load_truncated_backbone(str(directory), None, dtype, source.trust_remote_code)
    else:
        raise ModelError(
            f"{directory} holds neither a LoRA adapter (adapter_config.json) nor model weights (config.json)."
        )
    n_blocks = len(decoder_layers(backbone))
    if n_blocks != layer + 1:
        raise SidecarError(
            f"{directory}: the model has {n_blocks} blocks but the sidecar says layer K={layer} (needs K+1 = {layer + 1}); "
            "the sidecar and weights do not belong together."
        )
    has_tokenizer = (directory / "tokenizer_config.json").is_file()
    tokenizer = source.tokenizer(str(directory) if has_tokenizer else base_model or meta.base_model)
    d_model = text_config(backbone.config).hidden_size
    meta.verify(tokenizer, d_model=d_model, where=str(directory / MODEL_META))
    if is_lora:
        backbone = load_adapter(backbone, directory, is_trainable=trainable)
    else:
        for p in backbone.parameters():
            p.requires_grad_(trainable)
    head = _load_head(directory, d_model, load_file)
    head.weight.requires_grad_(trainable)
    ar = ARModel(backbone, layer, head, meta.ar_template, int(meta.extra.get("ar_max_tokens", AR_MAX_TOKENS)), meta)
    return ar.to(device).train(trainable), tokenizer


def _load_head(directory: Path, d_model: int, load_file) -> nn.Linear:
    if not (directory / HEAD_FILE).is_file():
        raise ModelError(
            f"{directory} has no {HEAD_FILE}; an AR checkpoint needs its value head (tensor 'weight' [d, d])."
        )
    try:
        weight = load_file(str(directory / HEAD_FILE)).get("weight")
    except unreadable_weights() as err:
        raise damaged(directory / HEAD_FILE, err) from None
    if weight is None or tuple(weight.shape) != (d_model, d_model):
        shape = None if weight is None else tuple(weight.shape)
        raise ModelError(
            f"{directory / HEAD_FILE}: expected tensor 'weight' of shape [{d_model}, {d_model}], got {shape}."
        )
    head = identity_head(d_model)
    with torch.no_grad():
        head.weight.copy_(weight.float())
    return head


def attach_to_shared_base(
    model: nn.Module, path: str | Path, tokenizer, adapter_name: str = "ar", trainable: bool = True
) -> ARModel:
    """Run a saved LoRA AR on a full causal LM shared with the AV (joint RL keeps one base in memory).

    `model`: the full causal LM, plain or already a PeftModel (e.g. holding the AV adapter). Adds
    adapter `adapter_name` on blocks 0..K, loads the saved AR adapter into it (the truncated
    backbone's `layers.N` is the causal LM's `<prefix>.layers.N`), and returns an ARModel reading
    block K by early exit. The caller activates the adapter (`set_adapter`) before AR forwards.
    """
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = role_folder(path, "ar")
    meta = read_ar_meta(directory)
    if not (directory / "adapter_config.json").is_file():
        raise ModelError(
            f"{directory} is a full-weight AR; only LoRA ARs can share a base model (use load_ar instead)."
        )
    meta.verify(tokenizer, d_model=text_config(model.config).hidden_size, where=str(directory / MODEL_META))
    config = saved_lora_config(directory)
    config.layers_to_transform, config.inference_mode = list(range(meta.layer_index + 1)), not trainable
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
    else:
        model = get_peft_model(model, config, adapter_name=adapter_name)
    inner = model.get_base_model()
    prefix = (
        f"base_model.model.{inner.base_model_prefix}."
        if hasattr(inner, inner.base_model_prefix)
        else "base_model.model."
    )
    state = {
        prefix + k.removeprefix("base_model.model."): v for k, v in load_file(str(directory / ADAPTER_FILE)).items()
    }
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    lost = [k for k in result.missing_keys if f".{adapter_name}." in k]
    if result.unexpected_keys or lost:
        raise ModelError(
            f"{directory}: adapter does not fit this base model ({(result.unexpected_keys or lost)[:2]} ...)."
        )
    head = _load_head(directory, text_config(model.config).hidden_size, load_file)
    head.weight.requires_grad_(trainable)
    ar = ARModel(
        model, meta.layer_index, head, meta.ar_template, int(meta.extra.get("ar_max_tokens", AR_MAX_TOKENS)), meta
    )
    return ar.to(next(model.parameters()).device)


def mse_scale_of(ar: ARModel) -> float:
    """The sidecar's mse_scale, else sqrt(d)."""
    scale = ((ar.meta.extra if ar.meta else {}).get("extraction") or {}).get("mse_scale")
    return float(scale) if scale else math.sqrt(ar.d_model)


def save_shared_ar(
    model: nn.Module, ar: ARModel, directory: str | Path, meta: Meta, adapter_name: str = "ar", tokenizer=None
) -> Path:
    """Inverse of `attach_to_shared_base`: write the AR adapter in the truncated-backbone layout.

    The saved folder is the same as `save_ar` writes after SFT, so `load_ar` and a later
    `attach_to_shared_base` read it unchanged.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner = model.get_base_model()
    prefix = (
        f"base_model.model.{inner.base_model_prefix}."
        if hasattr(inner, inner.base_model_prefix)
        else "base_model.model."
    )
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = {"base_model.model." + k.removeprefix(prefix): v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(directory / ADAPTER_FILE))
    # Saved as SFT writes it: every block of the truncated backbone, so no layer filter (a filter of
    # blocks 0..K would be re-applied to the truncated model's own numbering and could match nothing).
    config = model.peft_config[adapter_name]
    saved = config.inference_mode, config.layers_to_transform
    config.inference_mode, config.layers_to_transform = True, None
    try:
        config.save_pretrained(str(directory))
    finally:
        config.inference_mode, config.layers_to_transform = saved
    save_file({"weight": ar.head.weight.detach().float().cpu().contiguous()}, str(directory / HEAD_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_meta(directory / MODEL_META, meta)
    return directory
