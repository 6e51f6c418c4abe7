"""Training both stages: the config, data, the model wrapper and its loss, the loop, FSDP2,
checkpoints, progress logs and the writers of the official output layouts."""
