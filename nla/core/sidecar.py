"""`nla_meta.yaml`: the contract between datasets, checkpoints and the live tokenizer.

Dataset sidecars sit next to each parquet file (`<file>.nla_meta.yaml`, kind `nla_dataset`); model
sidecars sit inside each checkpoint folder (`nla_meta.yaml`, kind `nla_model`). Field names follow
the public reference format so released checkpoints load; older files that say actor/critic are
read as AV/AR. Every load verifies the tokens against the live tokenizer.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nla.core import templates
from nla.core.io import atomic_write_text

SCHEMA_VERSION = 1
MODEL_META = "nla_meta.yaml"


class SidecarError(ValueError):
    """A sidecar is missing, malformed or disagrees with the live tokenizer/model."""


@dataclass
class TokenSpec:
    injection_char: str
    injection_token_id: int
    injection_left_neighbor_id: int
    injection_right_neighbor_id: int
    critic_suffix_ids: list[int] = field(default_factory=list)  # reference name: ids of the AR prompt suffix
    av_prompt_ids: list[int] = field(default_factory=list)  # the whole AV prompt (ours; empty in the release format)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenSpec:
        try:
            return cls(
                injection_char=str(d["injection_char"]),
                injection_token_id=int(d["injection_token_id"]),
                injection_left_neighbor_id=int(d["injection_left_neighbor_id"]),
                injection_right_neighbor_id=int(d["injection_right_neighbor_id"]),
                critic_suffix_ids=[int(x) for x in d.get("critic_suffix_ids", d.get("ar_suffix_ids", [])) or []],
                av_prompt_ids=[int(x) for x in d.get("av_prompt_ids", []) or []],
            )
        except KeyError as err:
            raise SidecarError(f"sidecar 'tokens' lacks {err.args[0]!r}") from None

    @property
    def ids(self) -> tuple[int, int, int]:
        """(marker, left neighbour, right neighbour) as the injection code wants them."""
        return self.injection_token_id, self.injection_left_neighbor_id, self.injection_right_neighbor_id


def make_token_spec(
    tokenizer, injection_char: str, av_template: str = templates.AV_TEMPLATE, ar_template: str = templates.AR_TEMPLATE
) -> TokenSpec:
    """Record the marker id and its neighbours in the canonical AV prompt; raise if not usable."""
    marker = tokenizer.encode(injection_char, add_special_tokens=False)
    if len(marker) != 1:
        raise SidecarError(
            f"marker {injection_char!r} encodes to {len(marker)} tokens {marker}; it must be exactly one."
        )
    try:
        ids = templates.av_prompt_ids(tokenizer, injection_char, av_template)
    except templates.NoChatTemplate as err:
        raise SidecarError(f"{err}.") from None
    where = [i for i, t in enumerate(ids) if t == marker[0]]
    if len(where) != 1 or where[0] in (0, len(ids) - 1):
        raise SidecarError(
            f"marker {injection_char!r} (id {marker[0]}) appears {len(where)} times in the tokenized AV prompt; "
            "it must appear exactly once, with a token on each side. Choose another marker."
        )
    i = where[0]
    suffix = tokenizer.encode(templates.ar_suffix(ar_template), add_special_tokens=False)
    return TokenSpec(injection_char, marker[0], ids[i - 1], ids[i + 1], suffix, list(ids))


def verify_tokens(spec: TokenSpec, tokenizer, av_template: str = templates.AV_TEMPLATE, where: str = "sidecar") -> None:
    """Raise SidecarError (one line, with the fix) unless the live tokenizer reproduces `spec`."""
    try:
        live = make_token_spec(tokenizer, spec.injection_char, av_template)
    except SidecarError as err:
        raise SidecarError(f"{where}: {err} Was this data/checkpoint made with another tokenizer?") from None
    for name in ("injection_token_id", "injection_left_neighbor_id", "injection_right_neighbor_id"):
        if getattr(live, name) != getattr(spec, name):
            raise SidecarError(
                f"{where}: {name} is {getattr(spec, name)} but the live tokenizer gives {getattr(live, name)}; "
                "the data/checkpoint was made with a different tokenizer or template. Use the matching model."
            )
    if spec.av_prompt_ids and live.av_prompt_ids != spec.av_prompt_ids:
        diff = next(
            (i for i, (a, b) in enumerate(zip(spec.av_prompt_ids, live.av_prompt_ids)) if a != b),
            min(len(spec.av_prompt_ids), len(live.av_prompt_ids)),
        )
        raise SidecarError(
            f"{where}: the AV prompt tokenizes differently now than when this was made (first difference at "
            f"token {diff}); the chat template changed. Use the model/--chat_template it was made with."
        )


@dataclass
class Meta:
    """A parsed sidecar (dataset or model); unknown keys are kept in `extra`."""

    kind: str
    tokens: TokenSpec
    av_template: str = templates.AV_TEMPLATE
    ar_template: str = templates.AR_TEMPLATE
    d_model: int = 0
    layer_index: int | None = 0  # None: the sidecar names no layer (a released AV; its AR's sidecar has it)
    base_model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "kind": self.kind,
            "schema_version": SCHEMA_VERSION,
            "tokens": dataclasses.asdict(self.tokens),
            "prompt_templates": {"av": self.av_template, "ar": self.ar_template},
        }
        if self.kind == "nla_dataset":
            d["extraction"] = {
                "base_model": self.base_model,
                "d_model": self.d_model,
                "layer_index": self.layer_index,
                "norm": "none",
            }
        else:
            d["base_checkpoint"] = self.base_model
            d["d_model"] = self.d_model
            if self.extra.get("role") == "av":  # the layer the AV explains (the reference AV sidecar names none)
                if self.layer_index is not None:
                    d["extraction"] = {"layer_index": self.layer_index}
            else:
                d["ar"] = {"num_hidden_layers": self.layer_index}
        return _merge(d, self.extra)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "sidecar") -> Meta:
        if not isinstance(d, dict) or d.get("kind") not in ("nla_dataset", "nla_model"):
            raise SidecarError(f"{source}: not an NLA sidecar (kind must be nla_dataset or nla_model).")
        if "tokens" not in d:
            raise SidecarError(f"{source}: missing the 'tokens' section.")
        pt = d.get("prompt_templates", {}) or {}
        extraction = d.get("extraction", {}) or {}
        layer = extraction.get("layer_index")
        if layer is None:  # AR sidecars: ar.num_hidden_layers, or the older critic.extraction_layer_index
            layer = (d.get("ar") or {}).get("num_hidden_layers", (d.get("critic") or {}).get("extraction_layer_index"))
        if layer is None and d["kind"] == "nla_dataset":
            raise SidecarError(
                f"{source}: a dataset sidecar needs extraction.layer_index (the block its vectors come from)."
            )
        known = {"kind", "schema_version", "tokens", "prompt_templates", "d_model", "base_checkpoint", "ar", "critic"}
        return cls(
            kind=d["kind"],
            tokens=TokenSpec.from_dict(d["tokens"]),
            av_template=pt.get("av", pt.get("actor", templates.AV_TEMPLATE)),
            ar_template=pt.get("ar", pt.get("critic", templates.AR_TEMPLATE)),
            d_model=int(extraction.get("d_model", d.get("d_model", 0)) or 0),
            layer_index=None if layer is None else int(layer),
            base_model=str(extraction.get("base_model", d.get("base_checkpoint", ""))),
            extra={k: v for k, v in d.items() if k not in known and not (k == "extraction")}
            | (
                {
                    "extraction": {
                        k: v for k, v in extraction.items() if k not in ("base_model", "d_model", "layer_index", "norm")
                    }
                }
                if extraction
                else {}
            ),
        )

    def verify(self, tokenizer, d_model: int | None = None, where: str = "sidecar") -> None:
        verify_tokens(self.tokens, tokenizer, self.av_template, where)
        if d_model is not None and self.d_model and self.d_model != d_model:
            raise SidecarError(
                f"{where}: d_model is {self.d_model} but the model's hidden_size is {d_model}; wrong model for this data/checkpoint."
            )


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dataset_meta_path(parquet: str | Path) -> Path:
    return Path(str(parquet) + ".nla_meta.yaml")


def write_meta(path: str | Path, meta: Meta) -> Path:
    d = meta.to_dict()
    d.setdefault("provenance", {})["written_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    return atomic_write_text(path, yaml.safe_dump(d, sort_keys=False, allow_unicode=True))


def read_meta(path: str | Path) -> Meta:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_META
    if not path.is_file():
        raise SidecarError(f"{path} not found: every NLA dataset/checkpoint needs its nla_meta.yaml sidecar.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SidecarError(f"{path} is not valid YAML: {err}") from None
    return Meta.from_dict(data, str(path))
