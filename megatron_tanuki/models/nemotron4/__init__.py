"""Nemotron-4 (340B Instruct / Base / Reward, 15B): NVIDIA's teacher model, a second architecture."""
