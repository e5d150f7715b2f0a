"""Silence the import-time noise megatron-core prints when apex/TE are absent.

They are expected on CPU and on GPUs without TE (our specs do not use apex), and they bury the
messages users need. Real warnings from megatron-core still show.
"""
import logging
import warnings

_EXPECTED = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*absl.logging is not installed.*",
    r".*full scope is deprecated.*",
    r".*Transformer Engine is not installed.*",
)


def install() -> None:
    # torch.utils.cpp_extension logs "No CUDA runtime is found" when megatron imports it on CPU.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for pattern in _EXPECTED:
        warnings.filterwarnings("ignore", message=pattern)
