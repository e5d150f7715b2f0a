"""Nemotron-4 configs: HF ``config.json`` (model_type ``nemotron``) and NeMo ``model_config.yaml`` <-> Nemotron4Config.

Everything our model does not implement is refused by field name rather than converted into a
different model: another activation or normalization, linear biases, tied embeddings, a head_dim
that is not hidden / heads.
"""
from __future__ import annotations

from megatron_tanuki.models.nemotron4.config import Nemotron4Config
from megatron_tanuki.models.tanuki.hf_config import ConfigError, padded_vocab  # noqa: F401  (one error type)


def is_nemotron(hf: dict) -> bool:
    return hf.get("model_type") == "nemotron"


def _require(where: str, field: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {field} = {value!r} is not supported for Nemotron-4 (expected "
                          f"{' or '.join(map(repr, allowed))})")


def _head_dim(where: str, hidden: int, heads: int, head_dim) -> None:
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ConfigError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}")


def from_hf_config(hf: dict, where: str = "config.json") -> Nemotron4Config:
    try:
        heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
        _head_dim(where, hidden, heads, hf.get("head_dim"))
        _require(where, "hidden_act", hf.get("hidden_act", "relu2"), ("relu2",))
        for field in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            _require(where, field, bool(hf.get(field, False)), (False,))
        rope = hf.get("rope_parameters") or {}
        return Nemotron4Config(
            name=hf.get("_name_or_path") or "nemotron",
            vocab_size=padded_vocab(int(hf["vocab_size"])), hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]), num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            ffn_hidden_size=int(hf["intermediate_size"]), norm_eps=float(hf.get("norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rotary_percent=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            reward_outputs=int(hf.get("reward_outputs", 0)))
    except KeyError as e:
        raise ConfigError(f"{where}: missing field {e.args[0]!r}") from None


def to_hf_config(cfg: Nemotron4Config, hf_vocab: int | None = None) -> dict:
    """config.json of a NemotronForCausalLM (num_key_value_heads explicit: it defaults to None in 5.x)."""
    return {
        "model_type": "nemotron", "architectures": ["NemotronForCausalLM"],
        "vocab_size": hf_vocab or cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden_size, "hidden_act": "relu2", "norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.rotary_percent},
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 2, "eos_token_id": 3,
        "torch_dtype": "bfloat16",
        # a reward model: NemotronForCausalLM's tensors plus rm_head.{weight,bias} (ours; transformers ignores it)
        **({"reward_outputs": cfg.reward_outputs} if cfg.reward_outputs else {}),
    }


def from_nemo_config(y: dict, where: str, vocab_rows: int, reward_outputs: int = 0) -> Nemotron4Config:
    """A NeMo GPT ``model_config.yaml`` (the released Nemotron-4 folders) -> Nemotron4Config.

    ``vocab_rows``: the embedding's rows in the checkpoint (the vocab NeMo padded for its TP);
    ``reward_outputs``: rows of ``rm_head.weight`` when the checkpoint holds one (the Reward model).
    """
    try:
        _require(where, "normalization", y.get("normalization"), ("layernorm1p",))
        _require(where, "activation", y.get("activation"), ("squared-relu",))
        _require(where, "position_embedding_type", y.get("position_embedding_type", "rope"), ("rope",))
        _require(where, "bias", bool(y.get("bias", False)), (False,))
        _require(where, "share_embeddings_and_output_weights",
                 bool(y.get("share_embeddings_and_output_weights", False)), (False,))
        heads, hidden = int(y["num_attention_heads"]), int(y["hidden_size"])
        _head_dim(where, hidden, heads, y.get("kv_channels"))
        return Nemotron4Config(
            name=y.get("name") or "nemotron4", vocab_size=int(vocab_rows), hidden_size=hidden,
            num_layers=int(y["num_layers"]), num_attention_heads=heads,
            num_query_groups=int(y.get("num_query_groups") or heads), ffn_hidden_size=int(y["ffn_hidden_size"]),
            norm_eps=float(y.get("layernorm_epsilon", 1e-5)), rope_theta=float(y.get("rotary_base", 10000)),
            rotary_percent=float(y.get("rotary_percentage", 1.0)),
            max_position_embeddings=int(y.get("max_position_embeddings") or y.get("encoder_seq_length") or 4096),
            reward_outputs=int(reward_outputs))
    except KeyError as e:
        raise ConfigError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None
