"""Process start-up, parallel layout and the CPU compatibility layer (one place for all three)."""
