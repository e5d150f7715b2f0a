"""`tanuki serve`: an OpenAI-compatible HTTP server on the inference engine (loop.py: the ranks' lockstep engine loop)."""
