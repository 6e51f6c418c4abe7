"""Explanations: per-sentence relevance over the image patches, the sentence splitter and the
overlays drawn on the X-ray. Uses the model and the inference pipeline; serves infer.py and serve.py."""
