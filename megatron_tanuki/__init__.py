"""megatron_tanuki: the Tanuki family of Japanese LLMs on NVIDIA Megatron-Core."""
from megatron_tanuki import _quiet

_quiet.install()
__version__ = "0.1.0"
