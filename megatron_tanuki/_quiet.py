"""Silence the library notices that say nothing to a Tanuki user.

megatron-core and torch print them at import or on every checkpoint, once per process -- and the
demo and tests start many processes, so each shows up dozens of times and buries our own output.
All listed here are expected and not actionable for us:

* apex / Transformer Engine / absl "not installed": our layer specs do not use apex, and use TE
  when it is importable (specs.py); without it the local layers run.
* "MimoModelConfig is experimental": megatron-core announces a module we never use at import.
* "GPTModel IS DEPRECATED" (log record): megatron-core's own advice to move to HybridModel.
* "MCore's async save is deprecated" (log record): megatron-core's *synchronous* torch_dist save
  goes through its async path internally and warns although nothing is saved asynchronously.
* "all_gather_into_tensor is deprecated", "deprecating ShardedTensor", "argument order of load":
  torch deprecations of calls made inside megatron-core's checkpointing and optimizer.
* "torch.distributed is disabled ... single process": convert/mcore_io.py reads checkpoints
  without a process group on purpose.
* "Terminating process N via signal SIGTERM" (log record): torch stopping the other local ranks
  after one failed; runtime/spawn.py's RankFailed names the failing rank.

Real warnings (anything not matched here) still show. :func:`install` runs at package import, so
every spawned rank installs it too (spawned interpreters import megatron_tanuki before the rank's
function runs); runtime/spawn.py calls it again explicitly.
"""
import logging
import warnings

_EXPECTED = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*absl.logging is not installed.*",
    r".*full scope is deprecated.*",
    r".*Transformer Engine is not installed.*",
    r".*MimoModelConfig is experimental.*",
    r".*all_gather_into_tensor` is deprecated.*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
    r".*The argument order of load has been changed.*",
    r".*torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single process.*",
)

# logger name -> message prefixes dropped from it (log records, not warnings).
_LOGGED = {
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
    # When one rank fails, torch stops the others and says so; RankFailed already names the rank.
    "torch.multiprocessing.spawn": ("Terminating process",),
}


class _Drop(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Idempotent: warning filters replace their duplicates, log filters are added once."""
    # torch.utils.cpp_extension logs "No CUDA runtime is found" when megatron imports it on CPU.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for pattern in _EXPECTED:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in _LOGGED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))
