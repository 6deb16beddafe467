"""PyTorch -> Orbax conversion of the pretrained backbones and released segmentors."""
