"""Activation injection at the AV's marker token: pure functions, the forward hook, generate, PEFT."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from nla.models.injection import InjectionHook, find_marker_positions, inject, repeat_for_samples, rescale

PAD, LEFT, RIGHT, MARKER = 0, 5, 6, 7
SCALE = 4.0
D = 32


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        # HF's default init (std 0.02) makes attention near-uniform and greedy tokens barely
        # depend on the prompt; a wider init makes 'the vector changes the generation' testable.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(cfg).eval()


def prompt(prefix: list[int], suffix: list[int]) -> list[int]:
    return prefix + [LEFT, MARKER, RIGHT] + suffix


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(map(len, rows))
    ids = torch.tensor([[PAD] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


ROWS = [prompt([11, 12, 13], [20, 21]), prompt([30], [40, 41, 42, 43])]


def hand_built(model, ids, vectors):
    """The reference path: embedding module output (includes any embed scale), then replace."""
    embeds = model.get_input_embeddings()(ids)
    return inject(embeds, ids, vectors, MARKER, LEFT, RIGHT, SCALE)


def hook_for(model, vectors=None) -> InjectionHook:
    return InjectionHook(model, MARKER, LEFT, RIGHT, SCALE, vectors)


def test_rescale_norm_direction_and_zero():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1e-3, 0.0]], dtype=torch.bfloat16)
    out = rescale(v, 10.0)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0], torch.tensor([6.0, 8.0]))
    assert torch.equal(out[1], torch.zeros(2))  # zero stays zero, no NaN
    assert torch.allclose(out[2].norm(), torch.tensor(10.0), atol=1e-5) and out[2, 0] < 0


def test_find_positions_needs_both_neighbours():
    ids = torch.tensor(
        [
            [MARKER, 9, LEFT, MARKER, RIGHT, MARKER, RIGHT],  # col 0 edge; col 5 has wrong left
            [LEFT, MARKER, 9, LEFT, MARKER, RIGHT, LEFT],  # col 1 has wrong right
            [9, 9, 9, 9, 9, 9, LEFT],  # no marker at all
            [LEFT, MARKER, RIGHT, 9, 9, 9, MARKER],  # col 6 edge
        ]
    )
    pos = find_marker_positions(ids, MARKER, LEFT, RIGHT)
    assert pos.dtype == torch.long
    assert pos.tolist() == [[0, 3], [1, 4], [3, 1]]


def test_inject_is_pure_and_checks_count():
    ids, _ = left_pad(ROWS)
    embeds = torch.randn(*ids.shape, D)
    before = embeds.clone()
    vecs = torch.randn(2, D)
    out = inject(embeds, ids, vecs, MARKER, LEFT, RIGHT, SCALE)
    assert torch.equal(embeds, before)
    pos = find_marker_positions(ids, MARKER, LEFT, RIGHT)
    assert torch.allclose(out[pos[:, 0], pos[:, 1]], rescale(vecs, SCALE))
    other = torch.ones_like(ids, dtype=torch.bool)
    other[pos[:, 0], pos[:, 1]] = False
    assert torch.equal(out[other], embeds[other])
    with pytest.raises(ValueError, match="found 2 marker.*expected 3"):
        inject(embeds, ids, torch.randn(3, D), MARKER, LEFT, RIGHT, SCALE)
    # row 1 without its marker: 1 match for 2 vectors
    ids_missing = ids.clone()
    ids_missing[1][ids_missing[1] == MARKER] = 9
    with pytest.raises(ValueError, match="found 1 marker.*expected 2"):
        inject(embeds, ids_missing, vecs, MARKER, LEFT, RIGHT, SCALE)


def test_hook_count_mismatch_raises():
    model = tiny_llama()
    ids, mask = left_pad(ROWS)
    with hook_for(model, torch.randn(3, D)), pytest.raises(ValueError, match="found 2 marker.*expected 3"):
        model(input_ids=ids, attention_mask=mask)
    with hook_for(model), pytest.raises(ValueError, match="no vectors"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("rows", [ROWS[:1], ROWS], ids=["single", "left_padded_batch"])
def test_hook_matches_hand_built_and_detaches(rows):
    model = tiny_llama()
    ids, mask = left_pad(rows)
    vecs = torch.randn(len(rows), D)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        ref = model(inputs_embeds=hand_built(model, ids, vecs), attention_mask=mask).logits
        with hook_for(model, vecs) as hook:
            got = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    assert hook.calls == 1 and hook.injected == len(rows) and not hook.attached
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # removal restores plain behaviour


def _generate(model, ids, mask, **kw):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )


def test_generate_depends_only_on_vector():
    model = tiny_llama()
    ids, mask = left_pad([ROWS[0], ROWS[0], ROWS[1]])
    torch.manual_seed(1)
    a, b = torch.randn(D), torch.randn(D)
    vecs = torch.stack([a, a, b])
    t = ids.shape[1]
    with torch.no_grad(), hook_for(model, vecs) as hook:
        out1 = _generate(model, ids, mask)
        # 1 prompt pass + 4 decode steps; decode steps have no marker, so no error and no injection
        assert hook.calls == 5 and hook.injected == 3
        out2 = _generate(model, ids, mask)
        hook.set_vectors(torch.stack([a, b, b]))
        out3 = _generate(model, ids, mask)
    seq1, seq2, seq3 = out1.sequences[:, t:], out2.sequences[:, t:], out3.sequences[:, t:]
    assert torch.equal(seq1, seq2)  # identical vectors -> identical generations
    assert torch.equal(seq1[0], seq1[1])  # same prompt + same vector in one batch
    assert not torch.equal(seq3[0], seq3[1])  # same prompt, only the vector differs
    assert not torch.allclose(out3.logits[0][1], out1.logits[0][1])  # row 1 switched a -> b
    torch.testing.assert_close(out3.logits[0][0], out1.logits[0][0])  # row 0 kept a: rows don't leak


def test_generate_num_return_sequences_needs_repeated_vectors():
    model = tiny_llama()
    ids, mask = left_pad(ROWS)
    vecs = torch.randn(2, D)
    with torch.no_grad():
        with hook_for(model, vecs), pytest.raises(ValueError, match="found 4 marker.*expected 2"):
            _generate(model, ids, mask, num_beams=2, num_return_sequences=2)
        with hook_for(model, repeat_for_samples(vecs, 2)) as hook:
            _generate(model, ids, mask, num_beams=2, num_return_sequences=2)
    assert hook.injected == 4
    assert torch.equal(repeat_for_samples(vecs, 2), vecs[[0, 0, 1, 1]])


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def test_hook_under_peft_matches_hand_built_and_restores():
    peft_model = _lora(tiny_llama()).eval()
    ids, mask = left_pad(ROWS)
    vecs = torch.randn(2, D)
    with torch.no_grad():
        plain = peft_model(input_ids=ids, attention_mask=mask).logits
        ref = peft_model(inputs_embeds=hand_built(peft_model, ids, vecs), attention_mask=mask).logits
        with hook_for(peft_model, vecs) as hook:
            got = peft_model(input_ids=ids, attention_mask=mask).logits
        after = peft_model(input_ids=ids, attention_mask=mask).logits
    assert hook.calls == 1 and hook.injected == 2
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)


def test_gradient_flows_through_lora_with_injection():
    peft_model = _lora(tiny_llama())
    peft_model.train()
    ids, mask = left_pad(ROWS)
    vecs = torch.randn(2, D, requires_grad=True)
    with hook_for(peft_model, vecs) as hook:
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
    assert hook.injected == 2
    logits[:, -1].logsumexp(-1).sum().backward()
    lora = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None for g in lora.values())
    assert sum(g.abs().sum() for g in lora.values()) > 0
    assert vecs.grad is not None and vecs.grad.abs().sum() > 0  # the injected vector is on the graph
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_scaled_embedding_model_gets_exact_vector():
    """Gemma multiplies by sqrt(d) inside its embedding module; the hook writes after that, so the
    vector reaching layer 0 has norm exactly `scale` (no double scaling)."""
    torch.manual_seed(0)
    cfg = GemmaConfig(
        vocab_size=300,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        pad_token_id=PAD,
    )
    model = GemmaForCausalLM(cfg).eval()
    ids, mask = left_pad(ROWS)
    vecs = torch.randn(2, D)
    seen = []
    layer0 = model.model.layers[0]
    h = layer0.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad(), hook_for(model, vecs):
            got = model(input_ids=ids, attention_mask=mask).logits
        ref = model(inputs_embeds=hand_built(model, ids, vecs), attention_mask=mask).logits
    finally:
        h.remove()
    pos = find_marker_positions(ids, MARKER, LEFT, RIGHT)
    torch.testing.assert_close(seen[0][pos[:, 0], pos[:, 1]].norm(dim=-1), torch.full((2,), SCALE))
    torch.testing.assert_close(got, ref.detach())
