"""Inference: the pipeline (load, prompt, image -> embeddings), KV-cached generation, sampling,
image files, query records and the batch runner. Imports the model room, never train, explain or serve."""
