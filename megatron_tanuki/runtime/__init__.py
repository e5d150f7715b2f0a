"""Process start-up, parallel layout and the CPU compatibility layer (one place for all three)."""
from megatron_tanuki.runtime import quiet as _quiet

_quiet.install()
