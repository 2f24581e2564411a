"""dualsearch: dual-encoder (CLIP-style) training and natural-language image search."""
__version__ = "0.1.0"
