"""Flax modules. Models import nothing from training or file formats."""
