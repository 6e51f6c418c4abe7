"""LLaVA-Rad in plain PyTorch."""
