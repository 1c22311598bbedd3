"""Rollout engines (nla/models/engines.py).

Without vLLM (default suite): the prompt embeddings the vllm engine sends are what the injection
hook makes the model's blocks see (llama, and Gemma 3 with its embedding scale); an engine's
tokens become the same `Rollout` the hf engine builds; the merged weights are peft's merge.

With vLLM (marker `vllm`, `make test` runs them with the environment from `make vllm`): greedy
parity with the hf engine for an AV and after two successive weight updates; without the
prefix-cache reset the engine answers with stale weights; a joint RL step at temperature 0 writes
the same explanations with either engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nla.core.sidecar import Meta, make_token_spec
from nla.data.splits import load_split
from nla.models.av import Verbalizer, build_generation_batch, response_logprobs
from nla.models.engines import HFEngine, merged_state_dict, prompt_embeddings, rollout_from_tokens
from nla.models.injection import InjectionHook, rescale
from nla.models.lora import apply_lora
from nla.models.sources import load_causal_lm
from nla.testing import build_tiny_tokenizer, save_tiny_architecture, save_tiny_model

MARKER = "㈠"


def _verbalizer(model_dir: Path, scale: float = 4.0, seed: int = 0, lora: bool = True) -> Verbalizer:
    """An AV on a tiny model: LoRA with random (non-zero) B so the adapter changes the output."""
    tok = build_tiny_tokenizer()
    model = load_causal_lm(str(model_dir))
    if lora:
        model = apply_lora(model, 4)
        _perturb(model, seed)
    d = model.get_input_embeddings().weight.shape[-1]
    meta = Meta("nla_model", make_token_spec(tok, MARKER), d_model=d, layer_index=1, base_model=str(model_dir))
    return Verbalizer(model.eval(), tok, meta, scale, max_new_tokens=12)


def _perturb(model, seed: int, size: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * size)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prompt_embeddings_are_what_the_blocks_get(arch, tmp_path):
    v = _verbalizer(save_tiny_architecture(tmp_path / arch, arch), lora=False)
    vectors = torch.randn(3, v.meta.d_model)
    embeds = prompt_embeddings(v, vectors)  # what the vllm engine is sent
    ids, mask = build_generation_batch(v.tokenizer, 3, v.meta)
    seen = {}
    with torch.no_grad(), InjectionHook(v.model, *v.meta.tokens.ids, scale=4.0, vectors=vectors):
        handle = v.model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.update(embeds=out))
        try:
            v.model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
    assert torch.equal(embeds, seen["embeds"])  # exactly the blocks' input
    col = ids[0].tolist().index(v.meta.tokens.injection_token_id)
    assert torch.allclose(embeds[:, col], rescale(vectors, 4.0), atol=1e-6)  # the marker row: the rescaled vector
    plain = v.model.get_input_embeddings().weight[ids[0]]
    if arch == "gemma3":  # every other row: the token embedding with Gemma's x sqrt(d)
        plain = plain * torch.tensor(v.meta.d_model**0.5, dtype=plain.dtype)
    others = [j for j in range(ids.shape[1]) if j != col]
    assert torch.allclose(embeds[0, others], plain[others], atol=1e-5)


def test_engine_tokens_make_the_rollout_hf_makes(tmp_path):
    v = _verbalizer(save_tiny_model(tmp_path / "m", initializer_range=0.2))
    vectors = torch.randn(4, v.meta.d_model) * 3
    hf = HFEngine(v).rollout(vectors, 2, 1.0, 8)
    t = hf.prompt_len
    tokens = [row[m.bool()].tolist() for row, m in zip(hf.sequences[:, t:], hf.response_mask[:, t:])]
    lps = [[-1.0] * len(r) for r in tokens]
    got = rollout_from_tokens(hf.sequences[0, :t], tokens, lps, v.eos_ids, v.tokenizer, v.device)
    width = got.sequences.shape[1]
    assert torch.equal(got.response_mask, hf.response_mask[:, :width]) and not hf.response_mask[:, width:].any()
    assert torch.equal(got.sequences * got.attention_mask, (hf.sequences * hf.attention_mask)[:, :width])
    assert got.texts == hf.texts and torch.equal(got.hit_cap, hf.hit_cap)
    assert torch.equal(got.engine_logprobs != 0, got.response_mask.bool())


def _ranks(v: Verbalizer, ro, vectors: torch.Tensor, k: int) -> torch.Tensor:
    """Each sampled token's rank among the trainer's next-token logits (0 = the likeliest)."""
    from nla.models.injection import repeat_for_samples

    with torch.no_grad(), v.hook.set_vectors(repeat_for_samples(vectors, k)):
        logits = v.model(input_ids=ro.sequences, attention_mask=ro.attention_mask).logits
    t = ro.prompt_len
    chosen = ro.sequences[:, t:]
    before = logits[:, t - 1 : -1]  # the logits that chose each response token
    ranks = (before > before.gather(-1, chosen.unsqueeze(-1))).sum(-1)
    return ranks[ro.response_mask[:, t:].bool()]


def test_sampling_keeps_the_top_k_tokens(tmp_path):
    v = _verbalizer(save_tiny_model(tmp_path / "m", initializer_range=0.2))
    vectors = torch.randn(4, v.meta.d_model, generator=torch.Generator().manual_seed(3)) * 3
    torch.manual_seed(0)
    assert _ranks(v, HFEngine(v).rollout(vectors, 4, 2.0, 8, top_k=3), vectors, 4).max() < 3
    assert _ranks(v, HFEngine(v).rollout(vectors, 4, 2.0, 8, top_k=0), vectors, 4).max() >= 3  # 0: every token


def test_merged_weights_are_peft_merge(tmp_path):
    v = _verbalizer(save_tiny_model(tmp_path / "m", initializer_range=0.2))
    merged = merged_state_dict(v.model, "default")
    reference = {k: t.clone() for k, t in v.model.merge_and_unload().state_dict().items()}
    assert merged.keys() == reference.keys()
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in reference)


def test_the_saved_adapter_is_the_av_alone(tmp_path):
    """Adapter sync writes one adapter of a model holding several (as RL's does): peft loads it onto a
    fresh base as exactly the AV, and it is a small share of the merged weights."""
    from peft import PeftModel

    from nla.models.engines import save_adapter
    from nla.models.lora import lora_config

    model_dir = save_tiny_model(tmp_path / "m", initializer_range=0.2)
    v = _verbalizer(model_dir)
    v.model.add_adapter("other", lora_config(4))
    _perturb(v.model, seed=7)  # both adapters now non-zero
    v.model.set_adapter("default")
    written = save_adapter(v.model, "default", tmp_path / "adapter")
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        ours = v.model(input_ids=ids).logits
        fresh = PeftModel.from_pretrained(load_causal_lm(str(model_dir)), str(tmp_path / "adapter")).eval()
        theirs = fresh(input_ids=ids).logits
        v.model.set_adapter("other")
        other = v.model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, other, atol=1e-3)
    assert written < sum(t.numel() * t.element_size() for t in merged_state_dict(v.model, "default").values()) / 4


def test_sync_modes_resolve_by_device_and_adapter(tmp_path):
    from nla.models.engines import EngineError, cpu_share, lora_rank_for, resolve_sync

    v = _verbalizer(save_tiny_model(tmp_path / "m", initializer_range=0.2))
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_sync("auto", v.model, "default", cpu) == "merged"
    assert resolve_sync("auto", v.model, "default", cuda) == "adapter"
    assert resolve_sync("merged", v.model, "default", cuda) == "merged"
    assert lora_rank_for(v.model, "default") == 8  # rank 4 served at vLLM's next allowed rank
    plain = _verbalizer(tmp_path / "m", lora=False)
    assert resolve_sync("auto", plain.model, "default", cuda) == "merged"
    with pytest.raises(EngineError, match="fully fine-tuned"):
        resolve_sync("adapter", plain.model, "default", cpu)
    with pytest.raises(EngineError, match="rl_engine_sync='both'"):
        resolve_sync("both", v.model, "default", cpu)
    assert cpu_share(0, 1) is None
    shares = [cpu_share(i, 2) for i in range(2)]  # disjoint, non-empty shares of this process's cores
    assert all(shares) and not set(shares[0]) & set(shares[1])


def test_a_failed_engine_names_its_rank(tmp_path):
    """In a multi-process run the rank whose engine died is named in the one-line error."""
    from nla.models.engines import EngineError, VLLMEngine

    model_dir = save_tiny_model(tmp_path / "m", initializer_range=0.2)
    with pytest.raises(EngineError, match=r"^rank 1: the vLLM worker exited"):
        VLLMEngine(_verbalizer(model_dir), str(model_dir), python="/bin/false", rank=1, log_path=tmp_path / "w.log")


def test_a_missing_vllm_environment_says_how_to_build_it(tmp_path):
    from nla.models.engines import EngineError, find_vllm_python

    with pytest.raises(EngineError, match="make vllm"):
        find_vllm_python(str(tmp_path / "nope" / "python"))


# ---------------------------------------------------------------- with the vLLM environment


@pytest.fixture(scope="module")
def tiny_av_dir(tmp_path_factory):
    # 2 heads: head size 32 (vLLM's CPU attention has no kernel for the default 16)
    return save_tiny_model(tmp_path_factory.mktemp("vllm-tiny"), initializer_range=0.2, n_heads=2)


@pytest.fixture(scope="module", params=["merged", "adapter"])
def engine(request, vllm_python, tiny_av_dir):
    """A vLLM engine synced either way (--rl_engine_sync): every test below holds for both."""
    from nla.models.engines import VLLMEngine, lora_rank_for

    v = _verbalizer(tiny_av_dir)
    rank = lora_rank_for(v.model, "default") if request.param == "adapter" else 0
    eng = VLLMEngine(v, str(tiny_av_dir), vllm_python, max_model_len=128, sync_mode=request.param, lora_rank=rank)
    yield eng
    eng.close()


def _logprobs_now(v, vectors):
    """A function scoring a rollout's tokens under the AV's weights as they are now (a snapshot)."""
    import copy

    snapshot = copy.deepcopy(v.model.state_dict())

    def score(ro):
        current = copy.deepcopy(v.model.state_dict())
        v.model.load_state_dict(snapshot)
        try:
            return response_logprobs(v.model, ro.sequences, ro.attention_mask, ro.response_mask, vectors, v.hook)
        finally:
            v.model.load_state_dict(current)

    return score


def _greedy_pair(engine, vectors, max_new: int = 10):
    ours = HFEngine(engine.verbalizer).rollout(vectors, 1, 0.0, max_new)
    theirs = engine.rollout(vectors, 1, 0.0, max_new)
    return ours, theirs


@pytest.mark.vllm
def test_greedy_parity_across_weight_updates(engine):
    v = engine.verbalizer
    vectors = torch.randn(6, v.meta.d_model, generator=torch.Generator().manual_seed(1)) * 3
    texts, previous = [], None
    for version in range(3):  # the AV as loaded, then after two updates
        if version:
            _perturb(v.model, seed=10 + version)
        engine.sync(v.model, "default", version)
        ours, theirs = _greedy_pair(engine, vectors)
        assert theirs.texts == ours.texts, version
        assert torch.equal(theirs.sequences, ours.sequences[:, : theirs.sequences.shape[1]])
        # The engine's log-probs are the trainer's to float rounding: vLLM's CPU kernels drifted up to
        # 5e-3 from the trainer's on one fresh clone (1e-3 elsewhere), while the same tokens under the
        # other version's weights differ by far more (checked below).
        t = ours.prompt_len
        lp = response_logprobs(v.model, theirs.sequences, theirs.attention_mask, theirs.response_mask, vectors, v.hook)
        assert torch.allclose(theirs.engine_logprobs[:, t:], lp[:, t:], atol=1e-2)
        if (
            previous is not None
        ):  # the tolerance still tells the weights apart: the previous version's log-probs are far off
            assert (theirs.engine_logprobs[:, t:] - previous(theirs)[:, t:]).abs().max() > 0.1
        previous = _logprobs_now(v, vectors)
        texts.append(ours.texts)
    assert texts[0] != texts[1] != texts[2]  # the updates changed what the AV writes


@pytest.mark.vllm
def test_without_the_cache_reset_the_engine_is_stale(engine):
    if engine.sync_mode == "adapter":
        pytest.skip("a new adapter gets a new LoRA id, which vLLM's prefix cache keys on: the reset is kept anyway")
    v = engine.verbalizer
    vectors = torch.randn(6, v.meta.d_model, generator=torch.Generator().manual_seed(2)) * 3
    engine.sync(v.model, "default", 100)
    _greedy_pair(engine, vectors)  # the prompts are now in the prefix cache
    _perturb(v.model, seed=200, size=1.0)
    engine.reset_cache = False
    try:
        engine.sync(v.model, "default", 101)
        ours, stale = _greedy_pair(engine, vectors)
        assert stale.texts != ours.texts  # cached keys/values from the old weights
    finally:
        engine.reset_cache = True
    engine.version = -1  # forces the next sync, which resets the cache
    engine.sync(v.model, "default", 102)
    ours, fresh = _greedy_pair(engine, vectors)
    assert fresh.texts == ours.texts


@pytest.mark.vllm
def test_rl_step_at_temperature_zero_is_the_same_with_either_engine(vllm_python, tmp_path_factory, tiny_tokenizer):
    from test_rl import _cfg, _toy_splits

    from nla.stages import rl, train_ar, train_av
    from nla.train.distributed import make_accelerator

    model_dir = save_tiny_model(tmp_path_factory.mktemp("rl-vllm-model"), initializer_range=0.2, n_heads=2)
    out = tmp_path_factory.mktemp("rl-vllm")
    _toy_splits(out / "data", model_dir, tiny_tokenizer)
    cfg = _cfg(out, model_dir, "--av_steps", "40", "--ar_steps", "20")
    train_ar.run(cfg)
    train_av.run(cfg)
    data = load_split(out / "data" / "rl.parquet")
    sft_av, sft_ar = out / "av" / "final" / "av", out / "ar" / "final" / "ar"
    texts, sync_bytes = {}, {}
    for name, sync in (("hf", "auto"), ("vllm", "merged"), ("vllm", "adapter")):  # adapter: the AV's of four
        cfg = _cfg(
            out / name,
            model_dir,
            "--rl_temperature",
            "0",
            "--rl_rollout_engine",
            name,
            "--rl_engine_sync",
            sync,
            "--rl_vllm_python",
            vllm_python,
            "--rl_val_rows",
            "0",
            "--rl_batch_size",
            "4",
            "--rl_group_size",
            "2",
        )
        torch.manual_seed(0)
        trainer, *_ = rl.build_trainer(cfg, data, sft_av, sft_ar, None, make_accelerator("cpu"))
        try:
            steps = [trainer.step(data.vectors[:4])]
            _perturb(trainer.model, seed=3)  # greedy samples of a group are equal: zero advantages, no AV change;
            trainer.av_version += 1  # so change the AV by hand, as an update would, and step again
            steps.append(trainer.step(data.vectors[4:8]))
        finally:
            trainer.engine.close()
        texts[f"{name}-{sync}"] = [[s[1] for s in step.samples] for step in steps]
        if name == "vllm":
            assert all(abs(step.metrics["rl/engine_k3"]) < 1e-3 for step in steps), [
                s.metrics["rl/engine_k3"] for s in steps
            ]
            sync_bytes[sync] = steps[-1].metrics["rl/sync_bytes"]
    assert texts["vllm-merged"] == texts["hf-auto"] == texts["vllm-adapter"]
    assert 0 < sync_bytes["adapter"] < sync_bytes["merged"] / 4  # only the AV's LoRA weights travel


@pytest.mark.vllm
def test_sampled_tokens_carry_the_trainers_logprobs(engine):
    """At temperature 0.7 (RL's sampling) the engine's log-probs of its own samples are the trainer's:
    k3 ~ 0, as `rl/engine_k3` reads it, after a weight update synced either way."""
    from nla.core.rewards import k3_kl

    v = engine.verbalizer
    _perturb(v.model, seed=400)
    engine.sync(v.model, "default", 400)
    vectors = torch.randn(4, v.meta.d_model, generator=torch.Generator().manual_seed(5)) * 3
    from nla.models.injection import repeat_for_samples

    ro = engine.rollout(vectors, 4, 0.7, 10)
    each = repeat_for_samples(vectors, 4)
    lp = response_logprobs(v.model, ro.sequences, ro.attention_mask, ro.response_mask, each, v.hook)
    t = ro.prompt_len
    assert abs(float(k3_kl(ro.engine_logprobs[:, t:], lp[:, t:], ro.response_mask[:, t:]))) < 1e-3
    assert engine.sync_bytes > 0


@pytest.mark.vllm
def test_the_engine_samples_from_the_same_top_k(engine):
    v = engine.verbalizer
    engine.sync(v.model, "default", 300)
    vectors = torch.randn(4, v.meta.d_model, generator=torch.Generator().manual_seed(4)) * 3
    assert _ranks(v, engine.rollout(vectors, 4, 2.0, 8, top_k=3), vectors, 4).max() < 3
    assert _ranks(v, engine.rollout(vectors, 4, 2.0, 8, top_k=0), vectors, 4).max() >= 3
