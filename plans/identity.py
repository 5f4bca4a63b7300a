"""Model identity: what a plan or a profile was made for, and the check that a model matches it."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from plans.errors import CompressError

# config keys that decide the attention geometry; the hash covers these only, so dtype/name changes do not matter
_GEOMETRY_KEYS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
    "head_dim", "max_position_embeddings", "vocab_size", "sliding_window", "layer_types",
    "n_layer", "n_head", "n_embd", "n_positions", "rope_theta",
)


MAX_COUNT = 2**31 - 1  # bound on layer / head / position counts read from a file


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_type: str
    num_layers: int = Field(le=MAX_COUNT)
    num_heads: int = Field(le=MAX_COUNT)
    num_kv_heads: int = Field(le=MAX_COUNT)
    head_dim: int = Field(le=MAX_COUNT)
    max_positions: int | None = Field(None, le=MAX_COUNT)
    config_hash: str = ""
    name: str | None = None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_matches(self, other: "ModelIdentity", what: str, *, allow_other_model: bool = False) -> None:
        """Raise a CompressError naming the first field that differs between ``other`` (the model) and self.

        The geometry (model type, layers, heads, KV heads) must always match. ``head_dim`` and the config hash
        (:data:`_GEOMETRY_KEYS`: vocabulary, positions, RoPE base, sliding window, ...) tell a model of the same
        shape apart from the one the file was made for; they are checked unless ``allow_other_model``."""
        for field in ("model_type", "num_layers", "num_heads", "num_kv_heads"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                raise CompressError(f"{what} was made for {field}={a}, but the model has {field}={b}")
        if allow_other_model:
            return
        hint = "; to use it on this model anyway pass --allow-other-model (apply(..., allow_other_model=True))"
        if self.head_dim != other.head_dim:
            raise CompressError(f"{what} was made for head_dim={self.head_dim}, but the model has "
                                f"head_dim={other.head_dim}{hint}")
        if self.config_hash and other.config_hash and self.config_hash != other.config_hash:
            raise CompressError(f"{what} was made for another model of this shape (config hash {self.config_hash}, "
                                f"this model {other.config_hash}: vocabulary, positions, RoPE or window differ){hint}")


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
