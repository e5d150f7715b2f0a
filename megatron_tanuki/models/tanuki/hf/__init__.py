"""HF-side Tanuki-8x8B (config + modeling), self-contained so that exported folders carry them.

`tanuki convert mcore-to-hf` copies configuration_tanuki.py and modeling_tanuki.py next to the
weights and points config.json's auto_map at them, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` builds TanukiForCausalLM
(never a plain Mixtral, which would silently drop the router standardization).
"""
import os

HF_DIR = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_tanuki.py", "modeling_tanuki.py")
AUTO_MAP = {
    "AutoConfig": "configuration_tanuki.TanukiConfig",
    "AutoModelForCausalLM": "modeling_tanuki.TanukiForCausalLM",
}


def load_remote_code_classes():
    """(TanukiConfig, TanukiForCausalLM) from the files we ship (not from a checkpoint folder)."""
    from megatron_tanuki.models.tanuki.hf.configuration_tanuki import TanukiConfig
    from megatron_tanuki.models.tanuki.hf.modeling_tanuki import TanukiForCausalLM

    return TanukiConfig, TanukiForCausalLM
