import json
import time
from pathlib import Path

import pytest
import torch

from nla.models import ModelError, cache_root, load_causal_lm, resolve_model, tiny_llama


def test_embedded_conversion_matches_gguf(embedded_model_dir):
    """The converted safetensors model gives the same logits as the GGUF-loaded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(embedded_model_dir)
    report = json.loads((folder / "nla_conversion.json").read_text())
    assert report["n_params"] > 100e6
    gguf = cache_root() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = load_causal_lm(str(folder))
    assert ours.config.hidden_size == 576 and ours.config.num_hidden_layers == 30
    ids = tok("Natural language autoencoders explain activations.", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(ref(**ids).logits, ours(**ids).logits, atol=1e-5)
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))


def test_second_resolution_is_cached_and_fast(embedded_model_dir):
    start = time.time()
    assert resolve_model("embedded:smollm2-135m") == embedded_model_dir
    assert time.time() - start < 5


def test_bad_specs_say_how_to_fix(tmp_path):
    with pytest.raises(ModelError, match="--allow_hub"):
        resolve_model("some-org/some-model")
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="available"):
        resolve_model("embedded:nope")


def test_tiny_model_fixture_is_seeded_and_local(tiny_model_dir, tiny_model, tiny_tokenizer):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert tiny_model.config.num_hidden_layers == 4 and tiny_model.config.hidden_size == 64
    again = tiny_llama(len(tiny_tokenizer), seed=0)
    other = tiny_llama(len(tiny_tokenizer), seed=1)
    w = tiny_model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(w, again.model.layers[1].self_attn.q_proj.weight)
    assert not torch.equal(w, other.model.layers[1].self_attn.q_proj.weight)
    ids = tiny_tokenizer("hello world", return_tensors="pt")
    with torch.no_grad():
        logits = tiny_model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tiny_tokenizer)) and torch.isfinite(logits).all()
