"""LLaVA-Rad in plain PyTorch.

One subpackage per phase: model/ (the network and its files), infer/ (the pipeline, generation,
query files), train/ (both stages), explain/ (per-sentence heatmaps), metrics/ (evaluation),
serve/ (the HTTP server). The modules at this level are small helpers every room may use.
"""
