"""The model and its files: the Llama decoder, the ViT tower, LoRA, the projector, the tokenizer and
prompt, quantized linears, and reading checkpoints. Nothing here knows about query files, training
loops or HTTP; every other room imports from this one."""
