"""The AV pieces: SFT/generation batches, log-probs, the Verbalizer, save/load and sidecar checks.

(Hook vs hand-built inputs_embeds parity lives in tests/test_injection.py.)
"""

from __future__ import annotations

import pytest
import torch
import yaml

from nla.core import templates
from nla.core.sidecar import MODEL_META, Meta, SidecarError, make_token_spec
from nla.models.av import (
    IGNORE,
    Verbalizer,
    build_generation_batch,
    build_sft_batch,
    check_prompts,
    generated_mask,
    load_av,
    make_av_meta,
    pad,
    prompt_ids,
    response_logprobs,
    save_av,
    shared_prefix_length,
)
from nla.models.injection import InjectionHook, find_marker_positions
from nla.models.lora import apply_lora
from nla.testing import save_tiny_model

MARKER = "㈠"
D = 64
SCALE = 8.0


@pytest.fixture(scope="module")
def data_meta(tiny_tokenizer):
    return Meta(kind="nla_dataset", tokens=make_token_spec(tiny_tokenizer, MARKER), d_model=D, layer_index=1)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny llama with init std 0.2: at HF's 0.02 greedy text barely depends on the prompt."""
    return save_tiny_model(tmp_path_factory.mktemp("wide"), d_model=D, seed=1, initializer_range=0.2)


def wide_model(wide_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(wide_dir, dtype=torch.float32).eval()


def test_sft_batch_labels_mask_prompt_and_padding(tiny_tokenizer, data_meta):
    tok = tiny_tokenizer
    prompt = prompt_ids(tok, data_meta)
    responses = [templates.av_response("a short one"), templates.av_response("a much longer explanation; with parts")]
    batch = build_sft_batch(tok, prompt, responses)
    answers = [tok.encode(r, add_special_tokens=False) + [tok.eos_token_id] for r in responses]
    p = len(prompt)
    t = p + max(map(len, answers))
    assert batch["input_ids"].shape == (2, t)
    for row, ans in enumerate(answers):
        end = p + len(ans)
        assert batch["input_ids"][row, :p].tolist() == prompt  # one tokenization, no second BOS
        assert (batch["labels"][row, :p] == IGNORE).all()  # no loss on the prompt
        assert batch["labels"][row, p:end].tolist() == ans  # loss on response + EOS
        assert (batch["labels"][row, end:] == IGNORE).all()  # no loss on padding
        assert batch["attention_mask"][row].tolist() == [1] * end + [0] * (t - end)  # right-padded
    assert (batch["input_ids"][0, p + len(answers[0]) :] == tok.pad_token_id).all()


def test_marker_sits_where_the_sidecar_says(tiny_tokenizer, data_meta):
    tok, spec = tiny_tokenizer, data_meta.tokens
    prompt = prompt_ids(tok, data_meta)
    col = prompt.index(spec.injection_token_id)
    batch = build_sft_batch(tok, prompt, ["x", "a longer response"])
    gen_ids, gen_mask = build_generation_batch(tok, 3, data_meta)
    for ids in (batch["input_ids"], gen_ids):
        pos = find_marker_positions(ids, *data_meta.tokens.ids)
        assert pos[:, 0].tolist() == list(range(ids.shape[0]))  # exactly one per row
        assert (pos[:, 1] == col + (ids.shape[1] - len(prompt) if ids is gen_ids else 0)).all()
        rows = torch.arange(ids.shape[0])
        assert (ids[rows, pos[:, 1] - 1] == spec.injection_left_neighbor_id).all()
        assert (ids[rows, pos[:, 1] + 1] == spec.injection_right_neighbor_id).all()
    assert gen_mask.all() and gen_ids[0].tolist() == prompt


def test_pad_sides():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="right", fill=-1)
    assert ids.tolist() == [[5, 6, 7], [8, -1, -1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_check_prompts_refuses_template_drift(data_meta):
    good = templates.av_user_message(MARKER, data_meta.av_template)
    check_prompts([good, [{"role": "user", "content": good}]], data_meta)
    with pytest.raises(SidecarError, match="template drift"):
        check_prompts([good, good.replace("hidden", "secret")], data_meta)


def test_generated_mask_stops_after_first_eos():
    new = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    assert generated_mask(new, {2}).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_response_logprobs_match_a_full_forward(wide_dir, tiny_tokenizer, data_meta):
    model, tok = wide_model(wide_dir), tiny_tokenizer
    batch = build_sft_batch(tok, prompt_ids(tok, data_meta), ["ab", "a longer one"])
    vectors = torch.randn(2, D)
    mask = batch["labels"] != IGNORE
    hook = InjectionHook(model, *data_meta.tokens.ids, SCALE)
    got = response_logprobs(model, batch["input_ids"], batch["attention_mask"], mask, vectors, hook)
    assert not hook.attached  # attached only for the call
    with InjectionHook(model, *data_meta.tokens.ids, SCALE, vectors), torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    ref = torch.cat([torch.zeros(2, 1), ref], dim=1) * mask
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert (got[~mask] == 0).all() and (got[mask] < 0).all()
    # The vector matters: another vector gives other log-probs for the same tokens.
    other = response_logprobs(model, batch["input_ids"], batch["attention_mask"], mask, -vectors, hook)
    assert (other - got).abs().max() > 1e-3


def test_shared_prompt_prefix_gives_the_same_logprobs_and_gradients(wide_dir, tiny_tokenizer, data_meta):
    """The prompt before the marker runs once for the batch; log-probs and LoRA gradients must equal
    those of one forward over the whole batch (float rounding only)."""
    tok = tiny_tokenizer
    prompt = prompt_ids(tok, data_meta)
    batch = build_sft_batch(tok, prompt, ["ab", "a longer one", "c"])
    mask = batch["labels"] != IGNORE
    p = shared_prefix_length(batch["input_ids"], batch["attention_mask"], data_meta.tokens.ids[0], len(prompt) - 1)
    assert p == prompt.index(data_meta.tokens.ids[0]) - 1 and p >= 8  # the path under test is taken
    torch.manual_seed(0)
    model = apply_lora(wide_model(wide_dir), 4)
    for n, prm in model.named_parameters():  # LoRA B starts at zero: give it a value so A gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.1)
    vectors = torch.randn(3, D, requires_grad=True)
    hook = InjectionHook(model, *data_meta.tokens.ids, SCALE)
    results = []
    for share in (True, False):
        model.zero_grad()
        vectors.grad = None
        lp = response_logprobs(
            model, batch["input_ids"], batch["attention_mask"], mask, vectors, hook, share_prefix=share
        )
        lp.sum().backward()
        grads = {n: prm.grad.clone() for n, prm in model.named_parameters() if prm.requires_grad}
        results.append((lp.detach(), grads, vectors.grad.clone()))
    (lp_s, g_s, v_s), (lp_f, g_f, v_f) = results
    torch.testing.assert_close(lp_s, lp_f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_s, v_f, atol=1e-4, rtol=1e-3)
    assert g_s.keys() == g_f.keys() and len(g_s) > 0
    for n in g_s:
        torch.testing.assert_close(g_s[n], g_f[n], atol=1e-4, rtol=1e-3, msg=n)
    # A LoRA weight that only the prefix pass reaches still learns (the repeat carries its gradient).
    assert any(g.abs().sum() > 0 for n, g in g_s.items() if "lora_A" in n)


def test_rollout_with_the_shared_prefix_cache_equals_a_plain_generate(wide_dir, tiny_tokenizer, data_meta):
    """Verbalizer.rollout hands generate the prompt prefix's KV cache, repeated per row; the tokens
    must be those of a plain generate over the whole prompt (greedy, and sampled with one seed)."""
    from transformers import GenerationConfig

    from nla.models.injection import repeat_for_samples

    model, tok = wide_model(wide_dir), tiny_tokenizer
    av = Verbalizer(model, tok, data_meta, SCALE, max_new_tokens=10)
    vectors = torch.randn(3, D)
    ids, mask = build_generation_batch(tok, 3, data_meta)
    for k, temperature in ((1, 0.0), (2, 1.0)):
        torch.manual_seed(5)
        ro = av.rollout(vectors, num_samples=k, temperature=temperature)
        gen = GenerationConfig(
            max_new_tokens=10,
            do_sample=temperature > 0,
            temperature=temperature or None,
            top_p=None,
            top_k=None,
            num_return_sequences=k,
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(av.eos_ids),
        )
        torch.manual_seed(5)
        with InjectionHook(model, *data_meta.tokens.ids, SCALE, repeat_for_samples(vectors, k)), torch.no_grad():
            plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        assert ro.sequences[:, : plain.shape[1]].tolist() == plain.tolist()


def test_shared_prefix_stops_before_the_marker_and_at_differences():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99, 11, 13]])
    full = torch.ones_like(ids)
    assert shared_prefix_length(ids, full, marker_id=99, limit=100) == 9  # left neighbour goes with the marker
    assert shared_prefix_length(ids, full, marker_id=77, limit=100) == 12  # no marker: up to the first difference
    assert shared_prefix_length(ids, full, marker_id=77, limit=10) == 10
    left_padded = full.clone()
    left_padded[1, 0] = 0
    assert shared_prefix_length(ids, left_padded, marker_id=99, limit=100) == 0  # padding is not shared
    assert shared_prefix_length(ids, full, marker_id=5, limit=100) == 0  # under MIN_SHARED_PREFIX


def test_verbalize_depends_only_on_the_vector(wide_dir, tiny_tokenizer, data_meta):
    av = Verbalizer(wide_model(wide_dir), tiny_tokenizer, data_meta, SCALE, max_new_tokens=12)
    torch.manual_seed(0)
    v = torch.randn(3, D)
    vectors = torch.stack([v[0], v[1], v[0], v[2]])
    out = av.verbalize(vectors, temperature=0.0)
    texts = [s[0].text for s in out]
    assert texts[0] == texts[2]  # control: the same vector, the same greedy text
    assert len({texts[0], texts[1], texts[3]}) == 3  # only the vector differs between rows
    for s in out:
        assert s[0].failed and s[0].explanation is None and 1 <= s[0].n_tokens <= 12  # random model: no tags
    # num_return_sequences: sample j of row i must get vector i (repeat_interleave, not tile).
    # Near-zero temperature samples (the num_return_sequences path) are the greedy texts.
    for temperature in (0.0, 1e-4):
        rows = av.verbalize(v[:2], num_samples=2, temperature=temperature)
        assert [[s.text for s in row] for row in rows] == [[texts[0]] * 2, [texts[1]] * 2]
    sampled = av.verbalize(vectors[:2], num_samples=3, temperature=1.0)
    assert [len(s) for s in sampled] == [3, 3]
    assert av.hook.injected == 6  # num_return_sequences expanded the batch; every row got its vector


def test_rollout_masks_and_cap(wide_dir, tiny_tokenizer, data_meta):
    av = Verbalizer(wide_model(wide_dir), tiny_tokenizer, data_meta, SCALE, max_new_tokens=6)
    ro = av.rollout(torch.randn(2, D), num_samples=2, temperature=1.0)
    t = ro.prompt_len
    assert ro.sequences.shape[0] == 4 and ro.sequences.shape[1] <= t + 6
    assert (ro.response_mask[:, :t] == 0).all() and (ro.attention_mask[:, :t] == 1).all()
    n_resp = ro.response_mask.sum(-1)
    assert ((n_resp == 6) | ~ro.hit_cap).all()  # a capped row used every new token


def _lora_av(wide_dir, r):
    model = apply_lora(wide_model(wide_dir), r)
    if r > 0:  # LoRA B starts at zero: make the adapter non-trivial so a lost adapter shows
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("r", [4, 0])
def test_save_then_load_gives_identical_logits(tmp_path, wide_dir, tiny_tokenizer, data_meta, r):
    model = _lora_av(wide_dir, r)
    meta = make_av_meta(data_meta, D, str(wide_dir), SCALE, r, {"note": "test"})
    save_av(model, tiny_tokenizer, meta, tmp_path / "ckpt" / "av")
    assert (tmp_path / "ckpt" / "av" / ("adapter_model.safetensors" if r else "model.safetensors")).is_file()
    av = load_av(tmp_path / "ckpt", device="cpu")  # the checkpoint dir holding av/
    assert av.injection_scale == SCALE and av.meta.extra["role"] == "av" and av.meta.tokens == data_meta.tokens
    batch = build_sft_batch(tiny_tokenizer, prompt_ids(tiny_tokenizer, data_meta), ["some text"])
    vectors = torch.randn(1, D)
    logits = []
    for m in (model, av.model):
        with InjectionHook(m, *data_meta.tokens.ids, SCALE, vectors), torch.no_grad():
            logits.append(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    base = wide_model(wide_dir)
    with InjectionHook(base, *data_meta.tokens.ids, SCALE, vectors), torch.no_grad():
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert r == 0 or (plain - logits[1]).abs().max() > 1e-2  # the adapter really was loaded


def _reference_sidecar(tokenizer, d_model=D, char=MARKER, role="actor"):
    spec = make_token_spec(tokenizer, MARKER)
    return {
        "kind": "nla_model",
        "schema_version": 1,
        "role": role,
        "stage": "rl",
        "base_checkpoint": "some/hub-model",
        "d_model": d_model,
        "extraction": {"injection_scale": 150.0, "mse_scale": 8.0},
        "tokens": {
            "injection_char": char,
            "injection_token_id": spec.injection_token_id,
            "injection_left_neighbor_id": spec.injection_left_neighbor_id,
            "injection_right_neighbor_id": spec.injection_right_neighbor_id,
            "critic_suffix_ids": [1, 2],
        },
        "prompt_templates": {"actor": templates.AV_TEMPLATE, "critic": templates.AR_TEMPLATE},
    }


def _release_dir(path, wide_dir, sidecar):
    """A plain HF causal-LM folder + sidecar, as the reference releases an AV."""
    model = wide_model(wide_dir)
    model.save_pretrained(path)
    from nla.models.sources import load_tokenizer

    load_tokenizer(str(wide_dir)).save_pretrained(path)
    if sidecar is not None:
        (path / MODEL_META).write_text(yaml.safe_dump(sidecar, allow_unicode=True))
    return path


def test_reference_format_av_loads(tmp_path, wide_dir, tiny_tokenizer):
    path = _release_dir(tmp_path / "release", wide_dir, _reference_sidecar(tiny_tokenizer))
    av = load_av(path, device="cpu", max_new_tokens=5)
    assert av.injection_scale == 150.0 and av.meta.av_template == templates.AV_TEMPLATE
    out = av.verbalize(torch.randn(2, D), temperature=0.0)
    assert len(out) == 2 and av.hook.injected == 2


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_sidecar", "nla_meta.yaml"),
        ("d_model", "hidden_size"),
        ("marker", "exactly one"),
        ("role", "role"),
        ("scale", "injection_scale"),
        ("missing", "not found"),
    ],
)
def test_bad_checkpoints_fail_with_one_line(tmp_path, wide_dir, tiny_tokenizer, breakage, message):
    sidecar = _reference_sidecar(tiny_tokenizer)
    if breakage == "d_model":
        sidecar["d_model"] = 4096
    elif breakage == "marker":
        sidecar["tokens"]["injection_char"] = "✓"  # three tokens in this tokenizer
    elif breakage == "role":
        sidecar["role"] = "critic"
    elif breakage == "scale":
        del sidecar["extraction"]["injection_scale"]
    path = (
        tmp_path / "nowhere"
        if breakage == "missing"
        else _release_dir(tmp_path / "bad", wide_dir, None if breakage == "no_sidecar" else sidecar)
    )
    with pytest.raises(SidecarError) as err:
        load_av(path, device="cpu")
    assert message in str(err.value) and "\n" not in str(err.value)
