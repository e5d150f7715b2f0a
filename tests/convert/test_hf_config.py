"""config.json <-> TanukiConfig, including the released 8x8B config's quirks."""
import pytest

from megatron_tanuki.models.tanuki.config import TANUKI_8B, TANUKI_8X8B
from megatron_tanuki.models.tanuki.hf_config import ConfigError, from_hf_config, to_hf_config

RELEASED_8X8B = {
    "architectures": ["TanukiForCausalLM"], "model_type": "tanuki",
    "auto_map": {"AutoConfig": "configuration_tanuki.TanukiConfig",
                 "AutoModelForCausalLM": "modeling_tanuki.TanukiForCausalLM"},
    "vocab_size": 65024, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 4096, "num_local_experts": 8, "num_experts_per_tok": 2,
    "num_experts_per_topk": 2,  # the stray field of the released config
    "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_released_moe_config_maps_to_the_preset():
    cfg = from_hf_config(RELEASED_8X8B)
    assert cfg.replace(name="tanuki-8x8b") == TANUKI_8X8B


def test_dense_round_trip_through_config_json():
    assert from_hf_config(to_hf_config(TANUKI_8B)).replace(name="tanuki-8b") == TANUKI_8B


def test_stray_field_is_accepted_by_the_hf_class():
    from megatron_tanuki.models.tanuki.hf import load_remote_code_classes

    TanukiConfig, _ = load_remote_code_classes()
    cfg = TanukiConfig(**{k: v for k, v in RELEASED_8X8B.items() if k not in ("auto_map", "architectures")})
    assert cfg.model_type == "tanuki" and cfg.num_experts_per_topk == 2 and cfg.num_local_experts == 8


def test_missing_field_and_unknown_type_are_named():
    with pytest.raises(ConfigError, match="x/config.json: missing field 'intermediate_size'"):
        from_hf_config({k: v for k, v in RELEASED_8X8B.items() if k != "intermediate_size"}, "x/config.json")
    with pytest.raises(ConfigError, match="unknown model_type 'mixtral'"):
        from_hf_config({**RELEASED_8X8B, "model_type": "mixtral"})
