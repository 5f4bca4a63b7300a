"""Model identity: what a plan or a profile was made for, and the check that a model matches it."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict

from plans.errors import CompressError

# config keys that decide the attention geometry; the hash covers these only, so dtype/name changes do not matter
_GEOMETRY_KEYS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
    "head_dim", "max_position_embeddings", "vocab_size", "sliding_window", "layer_types",
    "n_layer", "n_head", "n_embd", "n_positions", "rope_theta",
)


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None = None
    config_hash: str = ""
    name: str | None = None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_matches(self, other: "ModelIdentity", what: str) -> None:
        """Raise a CompressError naming the first field that differs between ``other`` (the model) and self."""
        for field in ("model_type", "num_layers", "num_heads", "num_kv_heads"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                raise CompressError(f"{what} was made for {field}={a}, but the model has {field}={b}")


def text_config(config):
    """The decoder text config of a (possibly multimodal) HF config."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get else config


def identity_from_config(config, name: str | None = None) -> ModelIdentity:
    """ModelIdentity of a transformers PretrainedConfig."""
    c = text_config(config)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    kv = getattr(c, "num_key_value_heads", None) or heads
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    maxpos = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    d = c.to_dict()
    geom = {k: d.get(k) for k in _GEOMETRY_KEYS if k in d}
    h = hashlib.sha256(json.dumps(geom, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return ModelIdentity(
        model_type=c.model_type, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        max_positions=maxpos, config_hash=h, name=name,
    )
