"""Joint RL on a learnable toy: the AR can only reconstruct the vector if the AV names the right word.

The AV is warm-started on words drawn independently of the vectors (it learns the answer format,
not the vector), the AR on word -> centre. Reward can then rise only if RL teaches the AV to read
the injected vector; the shuffled-vector control (AV sees another row's vector) cannot.
"""

from __future__ import annotations

import pytest
import torch

from nla import templates
from nla.config import parse_config
from nla.data import write_split
from nla.sidecar import Meta, make_token_spec
from nla.testing import save_tiny_model

WORDS = ["red", "green", "blue", "yellow"]
LAYER = 1


def _toy_splits(data_dir, model_dir, tokenizer, d: int = 64, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(WORDS), d, generator=g) * 4.0
    meta = Meta("nla_dataset", make_token_spec(tokenizer, "㈠"), d_model=d, layer_index=LAYER, base_model=str(model_dir),
                extra={"suggested_injection_scale": float(centres.norm(dim=1).mean())})
    for split, n in [("av_sft", 128), ("ar_sft", 128), ("rl", 128), ("val", 32), ("test", 32)]:
        k = torch.randint(0, len(WORDS), (n,), generator=g)
        vectors = centres[k] + 0.05 * torch.randn(n, d, generator=g)
        words = [WORDS[i] for i in k]
        if split == "av_sft":  # format only: the word is independent of the vector
            words = [WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g)]
        columns = {
            "doc_id": [f"{split}-{i}" for i in range(n)], "explanation": words, "detokenized_text_truncated": words,
            "prompt": [templates.ar_prompt(w) if split == "ar_sft" else templates.av_user_message("㈠") for w in words],
            "response": [templates.av_response(w) for w in words],
        }
        write_split(data_dir / f"{split}.parquet", vectors, columns, meta)


def _cfg(out, model_dir, *extra):
    cfg, _ = parse_config(["--config", "configs/smoke.yaml", "--model", str(model_dir), "--output_dir", str(out),
                           "--layer", str(LAYER), "--av_steps", "60", "--av_lr", "1e-2", "--av_batch_size", "16", "--av_lora_r", "8",
                           "--ar_steps", "60", "--ar_lr", "5e-3", "--ar_batch_size", "8", "--max_new_tokens", "28",
                           "--rl_steps", "20", "--rl_batch_size", "4", "--group_size", "4", "--rl_av_lr", "5e-3",
                           "--rl_ar_lr", "1e-4", "--kl_coef", "0.0", "--max_response_tokens", "28", "--rl_save_every", "6",
                           "--temperature", "1.0", "--ar_eval_every", "60", "--av_eval_every", "60", "--ar_save_every", "60",
                           "--av_save_every", "60", *map(str, extra)])
    return cfg


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rl-toy-model"), initializer_range=0.2)


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory, toy_model_dir, tiny_tokenizer):
    """SFT AV (format only) + SFT AR (word -> centre) on the toy, shared by the RL tests."""
    from nla import train_ar, train_av

    out = tmp_path_factory.mktemp("rl-toy")
    _toy_splits(out / "data", toy_model_dir, tiny_tokenizer)
    cfg = _cfg(out, toy_model_dir)
    train_ar.run(cfg)
    av = train_av.run(cfg)
    assert av["extraction_fail_rate"] < 0.5, av  # the warm start writes the answer format
    return out


@pytest.mark.slow
def test_rl_raises_reward_above_start_and_control(warm_start, toy_model_dir):
    from nla import rl

    cfg = _cfg(warm_start, toy_model_dir)
    real = rl.run(cfg.replace(output_dir=str(warm_start)))
    control = rl.run(cfg.replace(output_dir=str(warm_start), rl_shuffle_control=True))
    print("real", real, "control", control)
    assert real["reward_last"] > real["reward_first"] + 0.3
    assert real["reward_last"] > control["reward_last"] + 0.3
