"""`make demo` / `tanuki demo`: the main job on a small embedded default (see demo/vlm.py)."""
