"""LoRA is a config flag: r > 0 wraps the model with peft adapters, r == 0 means full fine-tuning."""

from __future__ import annotations

import re
import warnings

from torch import nn

# Attention and MLP projections by their names in Llama, Qwen2, Mistral, Gemma(3) and Phi-3, whose
# fused qkv_proj / gate_up_proj would otherwise leave LoRA on o_proj and down_proj alone.
# Multimodal models (Gemma3ForConditionalGeneration): the vision tower reuses q_proj/k_proj/v_proj,
# but only the language model runs in an NLA.
NOT_LANGUAGE_MODEL = r".*(vision_tower|vision_model|multi_modal_projector).*"
TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
]


def untargeted_projections(model: nn.Module) -> list[str]:
    """Names of the Linear layers inside a decoder block that LoRA would not adapt (empty: all covered)."""
    from nla.models.backbone import decoder_layers

    block = decoder_layers(model)[0]
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in block.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in TARGET_MODULES
        }
    )


def lora_config(r: int, layers: list[int] | None = None, exclude: str | None = None):
    """A LoraConfig on the attention/MLP projections, optionally only on `layers` (AR: blocks 0..K)
    and never on modules matching `exclude`."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        exclude_modules=exclude,
        layers_to_transform=layers,
        bias="none",
    )


def apply_lora(model: nn.Module, r: int) -> nn.Module:
    """Wrap `model` with a trainable LoRA adapter (base weights frozen), or return it as is for r == 0."""
    if r <= 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    left_out = untargeted_projections(model)
    if left_out:
        warnings.warn(
            f"LoRA leaves these projections of {type(model).__name__}'s blocks unadapted: {', '.join(left_out)} "
            f"(targets: {', '.join(TARGET_MODULES)}).",
            stacklevel=2,
        )
    has_vision = any(re.fullmatch(NOT_LANGUAGE_MODEL, name) for name, _ in model.named_modules())
    return get_peft_model(model, lora_config(r, exclude=NOT_LANGUAGE_MODEL if has_vision else None))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
