"""Vision parts of Tanuki-vision: SigLIP tower with LLaVA-JP feature selection, S2, projector."""
