"""Residual output of block K without running the rest of the model.

A forward hook on block K records its output and raises `_StopForward`, so nothing after block K
runs (not the later blocks, not the final norm, not the LM head). The same function serves
datagen extraction, the AR read-out on a shared base model, and verbalize; on a model truncated to
K+1 blocks it simply stops at the last block. The result equals `hidden_states[K+1]`.
"""

from __future__ import annotations

import torch
from torch import nn


class _StopForward(Exception):
    pass


def layer_problem(layer: int, n_layers: int) -> str | None:
    """Why block `layer` of an `n_layers`-block model cannot be explained, or None when it can.

    The last block is refused: transformers' hidden_states[n] is that block's output *after* the
    final norm, so the documented equality (vector = hidden_states[K+1]) would not hold there.
    """
    if not 0 <= layer < n_layers:
        return f"layer {layer} is out of range (the model has blocks 0..{n_layers - 1})"
    if layer == n_layers - 1:
        return (
            f"layer {layer} is the last block, whose hidden_states entry is taken after the final norm; "
            f"choose a block between 0 and {n_layers - 2}"
        )
    return None


def text_config(config):
    """The language model's config: the config itself, or (multimodal models such as
    Gemma3ForConditionalGeneration) its text_config, where the block count and width live."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of an HF model (plain, CausalLM, multimodal or PEFT-wrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(text_config(base.config), "num_hidden_layers", None)
    for name, module in base.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == n
            and name.split(".")[-1] in ("layers", "h", "blocks")
            and "vision" not in name
        ):  # a vision tower's encoder layers are not the language model's
            return module
    raise ValueError(f"could not find the {n} decoder blocks of {type(base).__name__}")


def block_output(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int
) -> torch.Tensor:
    """[batch, seq, d_model] residual stream after block `layer` (0-based); grads flow if enabled.
    The forward stops there: the blocks after it never run."""
    return _capture(model, input_ids, attention_mask, layer, stop=True)[0]


def block_output_and_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after block `layer` ([batch, seq, d_model]) and the model's next-token logits
    ([batch, seq, vocab]) from one whole forward."""
    return _capture(model, input_ids, attention_mask, layer, stop=False)


def _capture(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int, stop: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block `layer`'s output, and the logits unless the forward `stop`s right after that block."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has blocks 0..{len(layers) - 1}.")
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, (tuple, list)) else output
        if stop:
            raise _StopForward

    handle = layers[layer].register_forward_hook(hook)
    logits = None
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"block {layer} never ran; is the model's forward unusual?")
    return captured["h"], logits


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch] index of the last real token, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def default_layer(n_layers: int) -> int:
    """About 2/3 depth (the published choice), as a block index."""
    return max(0, min(n_layers - 2, round(2 * n_layers / 3)))  # never the last block (see layer_problem)
