"""Checkpoints to resume a run: what trains, the optimizer state, the step and the RNG states.

Layout: <run>/checkpoints/step_0000500/{meta.json, rank0.pt, rank1.pt, ...}; each rank saves its
own shards (resume needs the same world size). A checkpoint is written under a ".tmp" name and
renamed only once every rank's file is complete, so a kill at any moment leaves either the new
checkpoint or none of it, never a broken one. The sampler's position is the step (data.StepSampler).
"""

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

PREFIX = "step_"


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _rng_state() -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(run_dir: Path, step: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    meta: dict, keep: int) -> Path:
    """Collective: every rank calls it. `step` is the number of optimizer steps done."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = run_dir / "checkpoints" / f"{PREFIX}{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    dist.barrier()
    opt = optimizer.state_dict()
    state = {
        "params": {name: _local(p).detach().clone() for name, p in params.items()},
        "optimizer": {"state": {i: {k: _local(v) for k, v in s.items()} for i, s in opt["state"].items()},
                      "param_groups": opt["param_groups"]},
        "rng": _rng_state(),
    }
    torch.save(state, tmp / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": world}, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a resume
        os.replace(tmp, final)  # the commit point
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    dist.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json: what the caller passed to save_checkpoint, the step and the world size."""
    return json.loads((path / "meta.json").read_text())


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Restore this rank's state saved by save_checkpoint; returns the step to continue from."""
    rank, world = dist.get_rank(), dist.get_world_size()
    saved = read_meta(path)
    if saved["world_size"] != world:
        raise ValueError(f"{path}: saved by {saved['world_size']} processes, resumed with {world}; resume with the same number")
    state = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    if set(state["params"]) != set(params):
        raise ValueError(f"{path}: holds {sorted(set(state['params']) ^ set(params))[:3]}... that this model does not match")
    for name, p in params.items():
        if state["params"][name].shape != _local(p).shape:
            raise ValueError(f"{path}: {name} has shape {tuple(state['params'][name].shape)}, this model's is "
                             f"{tuple(_local(p).shape)}")
    with torch.no_grad():
        for name, p in params.items():
            _local(p).copy_(state["params"][name])
    # The optimizer's moments were saved as local shards; wrap them back like their parameters.
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state = {}
    for i, s in state["optimizer"]["state"].items():
        p = ordered[int(i)]
        opt_state[int(i)] = {
            k: DTensor.from_local(v.to(_local(p).device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            if isinstance(p, DTensor) and v.dim() > 0 else v
            for k, v in s.items()
        }
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return saved["step"]
