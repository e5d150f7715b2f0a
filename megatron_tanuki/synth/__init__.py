"""`tanuki synth`: persona-driven synthetic conversations, filters, DPO pairs, VLM captions, export."""
