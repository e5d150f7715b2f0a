"""megatron_tanuki: the Tanuki family of Japanese LLMs on NVIDIA Megatron-Core."""
__version__ = "0.1.0"
