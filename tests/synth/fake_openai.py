"""Moved to megatron_tanuki/synth/fake_server.py (the benchmark uses it too); kept for older imports."""
from megatron_tanuki.synth.fake_server import *  # noqa: F401,F403
from megatron_tanuki.synth.fake_server import FakeServer, Hit, answer_for, prompt_tokens_for, request_digest  # noqa: F401
