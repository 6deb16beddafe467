"""Conversion of InternViT-6B weights (.pth, Hugging Face safetensors) and released
mmseg segmentors into Orbax checkpoints."""
