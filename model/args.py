"""ModelArgs: the one description of a LLaMA's shape, and its three builders.

Each checkpoint format names the same numbers differently; the builders below turn a Hugging Face
`config.json`, a Meta `params.json` or GGUF metadata into one `ModelArgs`, and nothing else in
the code ever reads those foreign keys.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


class ConfigError(ValueError):
    """A config that does not describe a LLaMA we can build."""


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling; None for plain RoPE. Llama 3.1's "llama3": {"factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (no "rope_type" key, as stored since
    # the first version); {"rope_type": "linear", "factor"}; {"rope_type": "yarn", "factor",
    # "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"}.
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    head_dim: int = 0  # 0 means dim // n_heads

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        ffn = 3 * self.dim * self.ffn_dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + ffn + 2 * self.dim) + emb + self.dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the SwiGLU hidden size (llama/model.py FeedForward)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


LLAMA31_ROPE_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rope_scaling_from_hf(scaling: dict | None, max_seq_len: int) -> dict | None:
    """ModelArgs.rope_scaling from config.json's rope_scaling / rope_parameters.

    Errors: ConfigError naming a scaling type we do not run (dynamic, longrope, ...).
    """
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type in (None, "default"):
        return None
    if rope_type == "llama3":
        return {k: scaling[k] for k in LLAMA31_ROPE_SCALING}
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": float(scaling["factor"])}
    if rope_type == "yarn":
        factor = float(scaling["factor"])
        return _yarn(factor, scaling.get("original_max_position_embeddings") or int(max_seq_len / factor),
                     scaling.get("beta_fast"), scaling.get("beta_slow"),
                     _yarn_attention_factor(factor, scaling.get("attention_factor"), scaling.get("mscale"),
                                            scaling.get("mscale_all_dim")), scaling.get("truncate", True))
    raise ConfigError(f"rope scaling {rope_type!r} is not supported (linear, yarn and llama3 are)")


def _yarn(factor: float, original: int, beta_fast, beta_slow, attention_factor: float,
          truncate: bool = True) -> dict:
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(original),
            "beta_fast": float(beta_fast or 32.0), "beta_slow": float(beta_slow or 1.0),
            "attention_factor": float(attention_factor), "truncate": bool(truncate)}


def _yarn_attention_factor(factor: float, given, mscale=None, mscale_all_dim=None) -> float:
    """YaRN's scale on cos and sin (so on attention logits, squared), as transformers derives it."""
    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if given is not None:
        return float(given)
    if mscale and mscale_all_dim:
        return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return get_mscale(factor)


def from_hf_config(cfg: dict) -> ModelArgs:
    arch = cfg.get("model_type") or ""
    if arch and arch != "llama":
        raise ConfigError(f"model_type is {arch!r}, not 'llama'")
    try:
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
        scaling = rope_scaling_from_hf(scaling, cfg.get("max_position_embeddings", 4096))
        return ModelArgs(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            head_dim=cfg.get("head_dim") or 0,
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}") from None


def from_meta_params(params: dict, vocab_size: int | None = None, max_seq_len: int = 8192) -> ModelArgs:
    """Meta's params.json; vocab_size may be -1 there, so the caller passes the embedding's rows."""
    try:
        dim = params["dim"]
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            vocab = vocab_size
        if vocab is None:
            raise ConfigError("params.json has no vocab_size and none was given")
        return ModelArgs(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=vocab,
            ffn_dim=meta_ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=dict(LLAMA31_ROPE_SCALING) if params.get("use_scaled_rope") else None,
            tie_embeddings=False,
            max_seq_len=params.get("max_seq_len", max_seq_len),
        )
    except KeyError as e:
        raise ConfigError(f"params.json lacks {e.args[0]!r}") from None


def from_gguf_metadata(meta: dict) -> ModelArgs:
    """GGUF key/value metadata (plain Python values), e.g. {"llama.block_count": 30, ...}."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"general.architecture is {arch!r}, not 'llama'")
    try:
        vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        scaling = _gguf_rope_scaling(meta)
        n_heads = meta["llama.attention.head_count"]
        return ModelArgs(
            dim=meta["llama.embedding_length"],
            n_layers=meta["llama.block_count"],
            n_heads=n_heads,
            n_kv_heads=meta.get("llama.attention.head_count_kv") or n_heads,
            vocab_size=int(vocab),
            ffn_dim=meta["llama.feed_forward_length"],
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_embeddings=bool(meta.get("_tied_embeddings", False)),
            max_seq_len=int(meta.get("llama.context_length", 4096)),
            head_dim=int(meta.get("llama.attention.key_length") or 0),
        )
    except KeyError as e:
        raise ConfigError(f"GGUF metadata lacks {e.args[0]!r}") from None


def _gguf_rope_scaling(meta: dict) -> dict | None:
    """llama.rope.scaling.* (and the older rope.scale_linear). Llama 3.1's scaling usually comes
    as a rope_freqs tensor instead, read by model/checkpoints.py."""
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor") or meta.get("llama.rope.scale_linear")
    original = meta.get("llama.rope.scaling.original_context_length")
    if kind in (None, "none") and "llama.rope.scale_linear" in meta:
        kind = "linear"
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        factor = float(factor)
        return _yarn(factor, original or int(meta.get("llama.context_length", 4096) / factor),
                     meta.get("llama.rope.scaling.yarn_beta_fast"), meta.get("llama.rope.scaling.yarn_beta_slow"),
                     _yarn_attention_factor(factor, None))
    if kind == "llama3":
        scaling = dict(LLAMA31_ROPE_SCALING, factor=float(factor or 8.0))
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise ConfigError(f"rope scaling {kind!r} is not supported (linear, yarn and llama3 are)")
