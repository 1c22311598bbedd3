"""AR model: truncated-backbone parity, identity head, loss identity, LoRA freezing, save/load, reference format."""

import json
import math

import pytest
import torch
import yaml

from nla.core import templates
from nla.core.metrics import cosine, mse_nrm
from nla.core.sidecar import Meta, SidecarError, make_token_spec
from nla.models.ar import (
    ARModel,
    attach_to_shared_base,
    build_ar,
    identity_head,
    load_ar,
    model_meta,
    save_ar,
    save_shared_ar,
)
from nla.models.backbone import last_token_index
from nla.models.sources import ModelError, load_tokenizer

TEXTS = ["a short one", "a somewhat longer explanation about lists and loops", ""]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def dataset_meta(tok, tiny_model_dir, layer=1):
    return Meta(
        "nla_dataset", make_token_spec(tok, "㈠"), d_model=64, layer_index=layer, base_model=str(tiny_model_dir)
    )


def reference_readout(model, tok, texts, layer, side):
    """The full HF model's hidden_states[layer + 1] at the last real token (the ground truth)."""
    tok.padding_side = side
    try:
        batch = tok([templates.ar_prompt(t) for t in texts], add_special_tokens=True, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "right"
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states[layer + 1]
    return batch, hs[torch.arange(len(texts)), last_token_index(batch["attention_mask"])]


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("side", ["left", "right"])
def test_truncated_readout_equals_hidden_states(tiny_model_dir, tiny_model, tok, layer, side):
    ar = build_ar(str(tiny_model_dir), layer, lora_r=0)
    assert len(ar.backbone.layers) == layer + 1 and isinstance(ar.backbone.norm, torch.nn.Identity)
    assert torch.equal(ar.head.weight, torch.eye(64))  # identity at init
    batch, ref = reference_readout(tiny_model, tok, TEXTS, layer, side)
    with torch.no_grad():
        got = ar(batch["input_ids"], batch["attention_mask"])
        shared = ARModel(tiny_model, layer, identity_head(64))(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(shared, ref, atol=1e-5)
    assert torch.allclose(ar.predict(TEXTS, tok, batch_size=2), ref, atol=1e-5)  # own tokenization, batched


def test_loss_is_two_one_minus_cos_and_over_length_flag(tiny_model_dir, tok):
    ar = build_ar(str(tiny_model_dir), 1, lora_r=4)
    target = torch.randn(3, 64)
    enc = ar.encode(TEXTS, tok)
    pred = ar(enc.input_ids, enc.attention_mask)
    loss = mse_nrm(pred, target, math.sqrt(64))
    assert torch.allclose(loss, 2 * (1 - cosine(pred, target)), atol=1e-5)
    assert not enc.over_length.any()
    ar.max_length = 10
    enc = ar.encode(TEXTS, tok)
    assert enc.over_length.tolist() == [True, True, True] and enc.input_ids.shape[1] == 10


def test_lora_freezes_base_and_trains_adapter_and_head(tiny_model_dir, tok):
    ar = build_ar(str(tiny_model_dir), 1, lora_r=4)
    named = dict(ar.named_parameters())
    lora = {n for n in named if "lora_" in n}
    assert lora and {n for n, p in named.items() if p.requires_grad} == lora | {"head.weight"}
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.AdamW(ar.trainable_parameters(), lr=1e-2)
    enc = ar.encode(TEXTS, tok)
    mse_nrm(ar(enc.input_ids, enc.attention_mask), torch.randn(3, 64)).mean().backward()
    opt.step()
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed and changed <= lora | {"head.weight"} and "head.weight" in changed
    assert any("lora_B" in n for n in changed)


def _perturb(ar: ARModel, seed=0):
    """Move every trainable weight off its init so a load that forgot something shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ar.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("lora_r", [4, 0])
def test_save_load_round_trip(tmp_path, tiny_model_dir, tok, lora_r):
    ar = build_ar(str(tiny_model_dir), 2, lora_r=lora_r)
    _perturb(ar)
    meta = model_meta(ar, dataset_meta(tok, tiny_model_dir, 2), str(tiny_model_dir), 8.0, {"ar_target_variance": 0.5})
    save_ar(ar, tmp_path / "ckpt" / "ar", meta, tok)
    files = {p.name for p in (tmp_path / "ckpt" / "ar").iterdir()}
    assert {"value_head.safetensors", "nla_meta.yaml"} <= files
    assert ("adapter_model.safetensors" in files) == (lora_r > 0) and ("model.safetensors" in files) == (lora_r == 0)
    side = yaml.safe_load((tmp_path / "ckpt" / "ar" / "nla_meta.yaml").read_text())
    assert side["role"] == "ar" and side["ar"] == {"num_hidden_layers": 2} and side["extraction"]["mse_scale"] == 8.0
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "ar"):  # checkpoint folder or the ar/ folder itself
        loaded, _ = load_ar(path)
        assert torch.allclose(loaded.predict(TEXTS, tok), ar.predict(TEXTS, tok), atol=1e-6)
        assert loaded.meta.extra["ar_target_variance"] == 0.5 and not loaded.trainable_parameters()


def test_lora_ar_runs_on_a_shared_full_base(tmp_path, tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    ar = build_ar(str(tiny_model_dir), 1, lora_r=4)
    _perturb(ar)
    save_ar(ar, tmp_path / "ar", model_meta(ar, dataset_meta(tok, tiny_model_dir), str(tiny_model_dir), 8.0, {}))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    shared = attach_to_shared_base(full, tmp_path / "ar", tok, adapter_name="ar")
    assert torch.allclose(shared.predict(TEXTS, tok), ar.predict(TEXTS, tok), atol=1e-5)
    # ... and what RL saves from the shared base loads back as a plain AR with the same predictions
    save_shared_ar(shared.backbone, shared, tmp_path / "rl_ar", shared.meta, adapter_name="ar")
    again, _ = load_ar(tmp_path / "rl_ar")
    assert torch.allclose(again.predict(TEXTS, tok), ar.predict(TEXTS, tok), atol=1e-5)


def write_reference_ar(folder, tiny_model_dir, tok, layer, critic_layer=None, d_model=64, role="critic"):
    """A public-reference-style release: HF folder with K+1 blocks, value head, old-style sidecar."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = layer + 1
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config).save_pretrained(folder)
    tok.save_pretrained(folder)
    weight = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    save_file({"weight": weight}, str(folder / "value_head.safetensors"))
    spec = make_token_spec(tok, "㈠")
    side = {
        "kind": "nla_model",
        "schema_version": 1,
        "role": role,
        "stage": "rl",
        "base_checkpoint": "org/hub-model",
        "d_model": d_model,
        "critic": {"extraction_layer_index": layer if critic_layer is None else critic_layer},
        "extraction": {"injection_scale": 150.0, "mse_scale": 8.0},
        "tokens": json.loads(json.dumps(spec.__dict__)),
        "prompt_templates": {"actor": templates.AV_TEMPLATE, "critic": templates.AR_TEMPLATE},
    }
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(side, allow_unicode=True))
    return weight


def test_reference_release_format_loads(tmp_path, tiny_model_dir, tiny_model, tok):
    weight = write_reference_ar(tmp_path, tiny_model_dir, tok, layer=1)
    ar, tok2 = load_ar(tmp_path)
    _, ref = reference_readout(tiny_model, tok, TEXTS, 1, "right")
    assert ar.layer == 1 and torch.allclose(ar.predict(TEXTS, tok2), ref @ weight.T, atol=1e-4)


@pytest.mark.parametrize(
    "breakage, error, match",
    [
        ("no_sidecar", SidecarError, "nla_meta.yaml"),
        ("d_model", SidecarError, "d_model is 128"),
        ("layers", SidecarError, "3 blocks"),
        ("role", SidecarError, "not an AR"),
        ("no_head", ModelError, "value_head"),
    ],
)
def test_bad_checkpoints_fail_with_one_line(tmp_path, tiny_model_dir, tok, breakage, error, match):
    write_reference_ar(
        tmp_path,
        tiny_model_dir,
        tok,
        layer=2,
        critic_layer=1 if breakage == "layers" else None,
        d_model=128 if breakage == "d_model" else 64,
        role="actor" if breakage == "role" else "critic",
    )
    if breakage == "no_sidecar":
        (tmp_path / "nla_meta.yaml").unlink()
    if breakage == "no_head":
        (tmp_path / "value_head.safetensors").unlink()
    with pytest.raises(error, match=match) as info:
        load_ar(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("layer, message", [(3, "last block"), (4, "out of range")])
def test_ar_refuses_the_last_block_and_beyond(tiny_model_dir, layer, message):
    with pytest.raises(ModelError, match=message):
        build_ar(str(tiny_model_dir), layer, lora_r=4)
