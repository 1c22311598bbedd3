"""backbone early exit, split I/O, checkpoint atomicity/resume."""

import random

import numpy as np
import pytest
import torch

from nla.core.sidecar import Meta, make_token_spec
from nla.data.splits import load_split, write_split
from nla.models.backbone import block_output, last_token_index
from nla.train.checkpoint import list_checkpoints, load_checkpoint_state, resolve_resume, save_checkpoint


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_block_output_equals_hidden_states(tiny_model, tiny_tokenizer, layer):
    # (not the last block: HF applies the final norm to the last hidden_states entry)
    batch = tiny_tokenizer(["a short one", "a somewhat longer sentence here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = tiny_model(**batch, output_hidden_states=True).hidden_states[layer + 1]
        got = block_output(tiny_model, batch["input_ids"], batch["attention_mask"], layer)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], ref[mask], atol=1e-5)


def test_block_output_skips_later_blocks(tiny_model, tiny_tokenizer):
    calls = []
    handles = [
        blk.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, blk in enumerate(tiny_model.model.layers)
    ]
    try:
        block_output(tiny_model, tiny_tokenizer("hi there", return_tensors="pt")["input_ids"], None, 1)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        block_output(tiny_model, torch.tensor([[1, 2]]), None, 9)


def test_last_token_index_any_padding_side():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(left).tolist() == [3, 3]
    assert last_token_index(right).tolist() == [1, 3]


def test_split_round_trip(tmp_path, tiny_tokenizer):
    meta = Meta("nla_dataset", make_token_spec(tiny_tokenizer, "㈠"), d_model=4, layer_index=1, base_model="tiny")
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_split(
        tmp_path / "val.parquet", vecs, {"doc_id": ["a", "a", "b"], "explanation": ["x", None, "z"]}, meta
    )
    split = load_split(path)
    assert torch.equal(split.vectors, torch.from_numpy(vecs)) and len(split) == 3
    assert split.column("explanation") == ["x", None, "z"] and split.meta.extra["row_count"] == 3
    assert len(load_split(path, max_rows=2)) == 2
    with pytest.raises(KeyError, match="no column"):
        split.column("nope")


def test_checkpoint_atomic_resume_and_rotation(tmp_path):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, lambda d: (d / "w.txt").write_text("x"), {"cursor": step * 10}, {"opt": opt})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002", "checkpoint-000003"]
    (tmp_path / "checkpoint-000009").mkdir()  # incomplete: no trainer_state.json, must be ignored
    latest = resolve_resume("auto", tmp_path)
    assert latest.name == "checkpoint-000003" and resolve_resume("never", tmp_path) is None
    torch.manual_seed(0)
    random.seed(0)
    save_checkpoint(tmp_path, 4, lambda d: None, {"cursor": 40})
    expected = (torch.rand(2), random.random())  # the draws that follow the saved RNG state
    torch.manual_seed(123)
    random.seed(123)
    state = load_checkpoint_state(tmp_path / "checkpoint-000004", {})
    assert state["cursor"] == 40 and torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    state3 = load_checkpoint_state(latest, {"opt": opt2})
    assert state3["cursor"] == 30 and opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    def boom(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 5, boom, {})
    assert not (tmp_path / "checkpoint-000005").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".")
    ]


def test_atomic_folders_follow_the_umask(tmp_path):
    """Checkpoints, finals and the model cache are built in a temp folder and renamed: the result
    must be readable by the group/others as the umask allows (mkdtemp alone gives 0700)."""
    import os

    from nla.core.io import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "final") as tmp:
            (tmp / "w.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755
