"""HF config.json <-> TanukiConfig. Dense Tanuki is ``llama``; the MoE is ``tanuki`` (Mixtral fields)."""
from __future__ import annotations

from megatron_tanuki.models.tanuki.config import TanukiConfig

DENSE_TYPES = ("llama",)
MOE_TYPES = ("tanuki",)


class ConfigError(ValueError):
    pass


def _rope_theta(hf: dict) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def padded_vocab(vocab: int, multiple: int = 128) -> int:
    return -(-vocab // multiple) * multiple


def from_hf_config(hf: dict, source: str = "config.json") -> TanukiConfig:
    model_type = hf.get("model_type")
    if model_type not in DENSE_TYPES + MOE_TYPES:
        raise ConfigError(
            f"{source}: unknown model_type {model_type!r}; expected 'llama' (Tanuki-8B) or "
            f"'tanuki' (Tanuki-8x8B)")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        if head_dim * heads != hidden:
            raise ConfigError(f"{source}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
        moe = {}
        if model_type in MOE_TYPES:
            topk = hf.get("num_experts_per_tok", hf.get("num_experts_per_topk", 2))
            moe = dict(num_experts=int(hf["num_local_experts"]), moe_topk=int(topk),
                       moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)))
        return TanukiConfig(
            name=hf.get("_name_or_path") or model_type,
            vocab_size=padded_vocab(int(hf["vocab_size"])),
            hidden_size=hidden, num_layers=int(hf["num_hidden_layers"]), num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads", heads)),
            ffn_hidden_size=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=_rope_theta(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **moe)
    except KeyError as e:
        raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None


def to_hf_config(cfg: TanukiConfig, hf_vocab: int | None = None) -> dict:
    """A config.json for a checkpoint that came from training (no source config to carry)."""
    base = {
        "vocab_size": hf_vocab or cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "intermediate_size": cfg.ffn_hidden_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    if cfg.is_moe:
        return {**base, "model_type": "tanuki", "architectures": ["TanukiForCausalLM"],
                "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.moe_topk,
                "router_aux_loss_coef": cfg.moe_aux_loss_coeff}
    return {**base, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "attention_bias": False, "mlp_bias": False}
