"""Weight conversion HF <-> Megatron: name tables (per model) read by one streaming engine."""
