"""torch.distributed for the flows: one code path from a plain process (world size 1) to torchrun.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group uses NCCL on GPU and gloo on CPU; the
model is wrapped in DDP, or sharded with FSDP2 ``fully_shard`` when asked. Losses normalised by a
token or pair count all-reduce that count (:func:`all_reduce_sum`) and scale by the world size,
because DDP/FSDP average gradients: N processes then give exactly the gradient of one process
over the whole global batch.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistState:
    """Join the process group when launched by torchrun; otherwise world size 1 on this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistState(device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistState(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(state: DistState):
    """Leave the process group together: a gloo rank that tears its group down while another still finishes
    its last step can abort that one ("terminate called without an active exception", seen in CI)."""
    if state.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value, state: DistState):
    """Sum a number or tensor over all processes (returned as the same kind)."""
    if not state.distributed:
        return value
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
    t = t.to(state.device if state.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t if isinstance(value, torch.Tensor) else t.item()


def broadcast_object(obj, state: DistState):
    if not state.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(state: DistState):
    if state.distributed:
        dist.barrier()


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4 / 2.5
    return fully_shard


def wrap_model(model: torch.nn.Module, state: DistState, fsdp: bool = False):
    """DDP (or FSDP2 per decoder layer + root) when distributed; the model itself otherwise."""
    if not state.distributed:
        return model
    if fsdp:
        fully_shard = _fully_shard()
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [state.local_rank] if state.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce for all but the last micro-batch of a step."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else nullcontext()


def is_sharded(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_model(model, state: DistState, fresh_factory):
    """The trained module, unsharded, for evaluation and saving on the main process.

    Plain and DDP models are returned as they are. An FSDP2 model's full state is gathered (a
    collective: every process calls this) into ``fresh_factory()`` on the main process; the others
    get None.
    """
    if not is_sharded(model):
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state.is_main:
        return None
    fresh = fresh_factory()
    fresh.load_state_dict(full)
    return fresh.to(state.device)
