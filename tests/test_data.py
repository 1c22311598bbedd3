import numpy as np
import pytest

from nla.core.config import ConfigError
from nla.core.sidecar import Meta, make_token_spec
from nla.data.splits import load_split, spread_rows, write_split


def test_spread_rows_draws_across_documents_and_is_seeded():
    doc_ids = [d for d in "aaaaaaaabbbbbbbbccccccccdddddddd"]  # 4 documents x 8 rows, in file order
    picked = spread_rows(doc_ids, 8, seed=0)
    assert picked == sorted(picked) and len(set(picked)) == 8
    assert sorted({doc_ids[i] for i in picked}) == ["a", "b", "c", "d"]  # first-8 would be one document
    assert all(sum(doc_ids[i] == d for i in picked) == 2 for d in "abcd")
    assert picked == spread_rows(doc_ids, 8, seed=0)
    assert spread_rows(doc_ids, 100) == list(range(32))
    assert len({doc_ids[i] for i in spread_rows(doc_ids, 3, seed=5)}) == 3


def test_missing_or_broken_split_is_one_line_error(tmp_path, tiny_model_dir):
    """train-ar/train-av read splits through load_split: a missing file or a parquet cut in half
    names the file and the fix instead of a traceback."""
    from nla.cli import main

    for stage in ("train-ar", "train-av"):
        rc = main(
            [
                stage,
                "--config",
                "configs/smoke.yaml",
                "--model",
                str(tiny_model_dir),
                "--output_dir",
                str(tmp_path / stage),
            ]
        )
        assert rc == 2
    with pytest.raises(ConfigError, match="not found: run `nla datagen`"):
        load_split(tmp_path / "nope.parquet")


def test_a_parquet_cut_in_half_is_one_line_error(tmp_path, tiny_tokenizer):
    meta = Meta("nla_dataset", make_token_spec(tiny_tokenizer, "㈠"), d_model=4, layer_index=1, base_model="tiny")
    path = write_split(tmp_path / "val.parquet", np.ones((3, 4), np.float32), {"doc_id": ["a", "b", "c"]}, meta)
    assert len(load_split(path)) == 3
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="val.parquet is not a readable parquet file.*rerun `nla datagen`") as err:
        load_split(path)
    assert "\n" not in str(err.value)


def test_nonfinite_rows_are_left_out_on_load_and_said(tmp_path, tiny_tokenizer, capsys):
    """Every stage reads splits through load_split: NaN/inf rows never reach any of them."""
    meta = Meta("nla_dataset", make_token_spec(tiny_tokenizer, "㈠"), d_model=4, layer_index=1, base_model="tiny")
    vectors = np.ones((5, 4), np.float32)
    vectors[1, 2], vectors[3, 0] = np.nan, np.inf
    path = write_split(
        tmp_path / "av_sft.parquet", vectors, {"doc_id": list("abcde"), "explanation": list("vwxyz")}, meta
    )
    split = load_split(path)
    assert len(split) == 3 and split.dropped_nonfinite == 2 and split.column("explanation") == ["v", "x", "z"]
    assert "left out 2 of 5 rows" in capsys.readouterr().err


def test_sidecar_width_disagreeing_with_the_vectors_is_one_line_error(tmp_path, tiny_tokenizer):
    meta = Meta("nla_dataset", make_token_spec(tiny_tokenizer, "㈠"), d_model=4, layer_index=1, base_model="tiny")
    path = write_split(tmp_path / "val.parquet", np.ones((3, 4), np.float32), {"doc_id": list("abc")}, meta)
    wrong = Meta("nla_dataset", meta.tokens, d_model=8, layer_index=1, base_model="tiny")
    from nla.core.sidecar import dataset_meta_path, write_meta

    write_meta(dataset_meta_path(path), wrong)
    with pytest.raises(ConfigError, match="width 4 but its sidecar says d_model=8"):
        load_split(path)
