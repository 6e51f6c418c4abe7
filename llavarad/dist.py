"""Small helpers for torchrun: one process per GPU (NCCL), or per CPU process (gloo) when there is
no GPU. Without torchrun every helper works as a single process, so scripts need no second path."""

import os

import torch
import torch.distributed as dist


def init_distributed(need_group: bool = False, device: torch.device | None = None) -> tuple[int, int, torch.device]:
    """The one place a process group starts. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) join
    it and return (rank, world size, this process's device): cuda:LOCAL_RANK when CUDA is available
    (NCCL), else the CPU (gloo).

    A plain `python script.py` gets (0, 1, `device`, by default cuda or cpu), and no process group
    unless `need_group`: FSDP2 needs one even for one process, so then it gets an in-memory
    one-process group. `close_distributed` ends either.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if need_group and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return rank, world, device


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so a log line appears once."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def sum_across_ranks(values: list[int]) -> list[int]:
    """Element-wise sum of small integer counters over all ranks (the values themselves in a single process)."""
    if not dist.is_initialized():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return t.tolist()


def close_distributed() -> None:
    """Leave the process group (a no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
