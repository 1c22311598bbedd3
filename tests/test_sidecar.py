import copy

import pytest

from nla.core import templates
from nla.core.sidecar import Meta, SidecarError, TokenSpec, make_token_spec, read_meta, verify_tokens, write_meta
from nla.testing import CHAT_TEMPLATE


def test_token_spec_records_neighbours(tiny_tokenizer):
    spec = make_token_spec(tiny_tokenizer, "㈠")
    ids = templates.av_prompt_ids(tiny_tokenizer, "㈠")
    i = ids.index(spec.injection_token_id)
    assert (ids[i - 1], ids[i + 1]) == (spec.injection_left_neighbor_id, spec.injection_right_neighbor_id)
    assert ids.count(spec.injection_token_id) == 1
    suffix = tiny_tokenizer.encode(templates.ar_suffix(), add_special_tokens=False)
    assert spec.critic_suffix_ids == suffix


def test_multi_token_marker_rejected(tiny_tokenizer):
    with pytest.raises(SidecarError, match="exactly one"):
        make_token_spec(tiny_tokenizer, "§§§")


def test_round_trip_and_wrong_tokenizer_fails(tmp_path, tiny_tokenizer, embedded_tokenizer):
    meta = Meta(
        "nla_dataset",
        make_token_spec(tiny_tokenizer, "㈠"),
        d_model=64,
        layer_index=2,
        base_model="tiny",
        extra={"row_count": 3, "extraction": {"positions_per_doc": 2}},
    )
    path = write_meta(tmp_path / "x.parquet.nla_meta.yaml", meta)
    back = read_meta(path)
    assert back.tokens == meta.tokens and back.d_model == 64 and back.layer_index == 2
    assert back.extra["row_count"] == 3 and back.extra["extraction"]["positions_per_doc"] == 2
    back.verify(tiny_tokenizer, d_model=64)
    with pytest.raises(SidecarError, match="hidden_size"):
        back.verify(tiny_tokenizer, d_model=576)
    with pytest.raises(SidecarError):
        back.verify(embedded_tokenizer)  # another tokenizer: the marker/neighbours differ


def test_model_sidecars_name_the_layer_by_role(tmp_path, tiny_tokenizer):
    """The AR sidecar says ar.num_hidden_layers (reference format); the AV's says extraction.layer_index."""
    import yaml

    spec = make_token_spec(tiny_tokenizer, "㈠")
    raw = {}
    for role in ("av", "ar"):
        meta = Meta(
            "nla_model",
            spec,
            d_model=64,
            layer_index=3,
            base_model="tiny",
            extra={"role": role, "extraction": {"injection_scale": 2.0}},
        )
        path = write_meta(tmp_path / f"{role}.yaml", meta)
        raw[role] = yaml.safe_load(path.read_text())
        assert read_meta(path).layer_index == 3
    assert raw["ar"]["ar"] == {"num_hidden_layers": 3}
    assert "ar" not in raw["av"] and raw["av"]["extraction"] == {"layer_index": 3, "injection_scale": 2.0}


def test_reference_field_names_accepted(tiny_tokenizer):
    spec = make_token_spec(tiny_tokenizer, "㈠")
    old = {
        "kind": "nla_model",
        "role": "critic",
        "d_model": 64,
        "critic": {"extraction_layer_index": 2},
        "tokens": {**spec.__dict__},
        "prompt_templates": {"actor": templates.AV_TEMPLATE, "critic": templates.AR_TEMPLATE},
    }
    meta = Meta.from_dict(old)
    assert meta.layer_index == 2 and meta.ar_template == templates.AR_TEMPLATE
    verify_tokens(meta.tokens, tiny_tokenizer)


def test_missing_sidecar_is_one_clear_line(tmp_path):
    with pytest.raises(SidecarError, match="nla_meta.yaml"):
        read_meta(tmp_path)


def test_extract_explanation():
    assert templates.extract_explanation("x <explanation>\n a; b \n</explanation> y") == "a; b"
    assert templates.extract_explanation("<explanation>unclosed") is None
    assert templates.extract_explanation("<explanation> </explanation>") is None
    assert templates.extract_explanation(templates.av_response("topic")) == "topic"


# A Llama-3.x-style template: it prints today's date unless the caller passes date_string.
DATED_TEMPLATE = (
    "{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n" + CHAT_TEMPLATE
)


def test_dated_chat_templates_render_one_fixed_date(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = DATED_TEMPLATE
    ids = templates.av_prompt_ids(tok, "㈠")
    assert templates.CHAT_TEMPLATE_DATE in tok.decode(ids)
    today = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert templates.CHAT_TEMPLATE_DATE not in today  # without the fixed date the prompt would drift daily


def test_whole_av_prompt_is_recorded_and_checked(tiny_tokenizer):
    spec = make_token_spec(tiny_tokenizer, "㈠")
    assert spec.av_prompt_ids == templates.av_prompt_ids(tiny_tokenizer, "㈠")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "<|im_start|>system\nBe brief.<|im_end|>\n" + CHAT_TEMPLATE  # marker neighbours unchanged
    with pytest.raises(SidecarError, match="AV prompt tokenizes differently.*first difference at token 1"):
        verify_tokens(spec, tok)
    verify_tokens(TokenSpec(**{**spec.__dict__, "av_prompt_ids": []}), tok)  # release sidecars record no prompt


def test_no_chat_template_is_one_line_error(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(SidecarError, match="no chat template.*--chat_template FILE"):
        make_token_spec(tok, "㈠")
