"""Every supported architecture, as a tiny random model built from its transformers config:
the two invariants (AR early exit = hidden_states[K+1]; injected row = rescaled vector, after any
embedding scale), LoRA on every block projection and nothing else, and the whole pipeline
(datagen -> train-ar -> train-av -> rl -> eval, then verbalize) on the smoke budget."""

from __future__ import annotations

import json

import pytest
import torch

from nla.cli import main
from nla.core.sidecar import make_token_spec
from nla.core.templates import av_prompt_ids
from nla.models.ar import build_ar
from nla.models.av import IGNORE, build_sft_batch, response_logprobs
from nla.models.backbone import block_output, decoder_layers
from nla.models.injection import InjectionHook, rescale
from nla.models.lora import apply_lora, untargeted_projections
from nla.models.patching import next_token_logprobs
from nla.models.sources import load_causal_lm
from nla.testing import ARCHITECTURES, build_tiny_tokenizer, save_tiny_architecture

LAYER = 1
TEXTS = ["a short one", "a somewhat longer sentence here"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_dir(request, tmp_path_factory):
    return request.param, save_tiny_architecture(tmp_path_factory.mktemp(request.param) / "model", request.param)


def test_invariants_and_lora_coverage(arch_dir):
    arch, path = arch_dir
    tok = build_tiny_tokenizer()
    model = load_causal_lm(str(path)).eval()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).hidden_states[LAYER + 1]
        assert torch.allclose(
            block_output(model, batch["input_ids"], batch["attention_mask"], LAYER)[mask], ref[mask], atol=1e-5
        )
        ar = build_ar(str(path), LAYER, lora_r=4)  # truncated to blocks 0..K, LoRA still zero
        assert len(decoder_layers(ar.backbone)) == LAYER + 1
        assert torch.allclose(
            block_output(ar.backbone, batch["input_ids"], batch["attention_mask"], LAYER)[mask], ref[mask], atol=1e-5
        )

    spec = make_token_spec(tok, "㈠")
    ids = torch.tensor([av_prompt_ids(tok, "㈠")])
    vector = torch.randn(1, model.get_input_embeddings().weight.shape[-1])
    seen = {}
    with torch.no_grad(), InjectionHook(model, *spec.ids, scale=3.0, vectors=vector):
        # registered after the injection hook, so it sees the embedding output the blocks get
        handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.update(embeds=out))
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
    col = ids[0].tolist().index(spec.injection_token_id)
    assert torch.allclose(seen["embeds"][0, col], rescale(vector, 3.0)[0], atol=1e-5)  # Gemma's x sqrt(d) included once

    # The shared prompt prefix (its KV cache repeated per row) gives the log-probs of one plain
    # forward, sliding-window layers included (tiny Gemma 3 / Mistral windows are shorter than the prompt).
    batch_sft = build_sft_batch(tok, av_prompt_ids(tok, "㈠"), ["<explanation>\nab\n</explanation>", "a longer answer"])
    response = batch_sft["labels"] != IGNORE
    hook = InjectionHook(model, *spec.ids, scale=3.0)
    two = torch.randn(2, vector.shape[-1])
    with torch.no_grad():
        shared = response_logprobs(model, batch_sft["input_ids"], batch_sft["attention_mask"], response, two, hook)
        plain = response_logprobs(
            model, batch_sft["input_ids"], batch_sft["attention_mask"], response, two, hook, share_prefix=False
        )
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)

    # Reinjection's cached runs (the tokens before the last run once) against plain full forwards.
    last = batch["attention_mask"].sum(1) - 1
    rows = torch.arange(len(TEXTS))
    patch = torch.randn(len(TEXTS), vector.shape[-1]) * 3

    def patch_last(_m, _a, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[rows, last] = patch
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    with torch.no_grad():
        original, h, (patched,) = next_token_logprobs(
            model, batch["input_ids"], batch["attention_mask"], LAYER, [patch]
        )
        plain_logits = model(**batch).logits[rows, last]
        handle = decoder_layers(model)[LAYER].register_forward_hook(patch_last)
        try:
            patched_logits = model(**batch).logits[rows, last]
        finally:
            handle.remove()
    torch.testing.assert_close(h, ref[rows, last], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(original, torch.log_softmax(plain_logits.float(), -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(patched, torch.log_softmax(patched_logits.float(), -1), atol=1e-4, rtol=1e-4)

    assert untargeted_projections(model) == []
    lora = apply_lora(load_causal_lm(str(path)), 4)
    adapted = {n.split(".lora_A")[0] for n, _ in lora.named_parameters() if ".lora_A." in n}
    assert adapted and not any("vision" in n or "projector" in n for n in adapted)
    # every block, the same projections in each
    assert len(adapted) == sum(1 for _ in decoder_layers(lora)) * len({n.rsplit(".", 1)[-1] for n in adapted})


def test_whole_pipeline(arch_dir, tmp_path):
    arch, path = arch_dir
    out = tmp_path / "run"
    rc = main(
        [
            "demo",
            "--config",
            "configs/smoke.yaml",
            "--model",
            str(path),
            "--output_dir",
            str(out),
            "--teacher",
            "extractive",
            "--eval_max_rows",
            "8",
            "--rl_steps",
            "2",
            "--av_max_new_tokens",
            "8",
            "--rl_max_new_tokens",
            "8",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rl"]["n"] > 0 and summary["rl"]["oracle"]
    rc = main(
        [
            "verbalize",
            "--config",
            "configs/smoke.yaml",
            "--checkpoint",
            str(out / "rl" / "final"),
            "--text",
            "def add(a, b): return a + b",
            "--positions",
            "3,6",
            "--rerank_with_ar",
            "true",
            "--num_samples",
            "2",
            "--out",
            str(tmp_path / "v.jsonl"),
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert rc == 0 and len(rows) == 2 and all("mse_nrm" in r for r in rows)


@pytest.mark.parametrize(
    "config, arch",
    [
        ("configs/qwen2.5-7b-l20.yaml", "qwen2"),
        ("configs/llama-3.3-70b-l53.yaml", "llama"),
        ("configs/gemma-3-12b-l32.yaml", "gemma3-multimodal"),
    ],
)
def test_published_configs_run_datagen_on_a_tiny_stand_in(config, arch, tmp_path):
    """The published settings (dtype, positions, injection scale ...) with the model, corpus, teacher
    and sizes swapped for a local tiny model of the same architecture."""
    path = save_tiny_architecture(tmp_path / "model", arch)
    rc = main(
        [
            "datagen",
            "--config",
            config,
            "--model",
            str(path),
            "--allow_hub",
            "false",
            "--layer",
            str(LAYER),
            "--corpus",
            "builtin:python-docs",
            "--max_docs",
            "6",
            "--max_doc_tokens",
            "48",
            "--min_position",
            "8",
            "--split_fractions",
            "1,0,0,0,0",
            "--teacher",
            "extractive",
            "--output_dir",
            str(tmp_path / "run"),
            "--report_to",
            "none",
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "data" / "datagen_summary.json").read_text())
    assert sum(summary["rows"].values()) > 0
