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


def all_gather_object(obj, state: DistState) -> list:
    """Every process's ``obj`` (picklable; tensors moved to CPU first), in rank order; ``[obj]`` at world size 1."""
    obj = _to_cpu(obj)
    if not state.distributed:
        return [obj]
    out = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def barrier(state: DistState):
    if state.distributed:
        dist.barrier()


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4 / 2.5
    return fully_shard


def wrap_model(model: torch.nn.Module, state: DistState, fsdp: bool = False, offload: bool = False):
    """DDP (or FSDP2 per decoder layer + root, see :func:`shard`) when distributed; the model itself otherwise."""
    if not state.distributed:
        return model
    if fsdp:
        return shard(model, offload=offload)
    from torch.nn.parallel import DistributedDataParallel

    ids = [state.local_rank] if state.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(model: torch.nn.Module, *, frozen: bool = False, offload: bool = False) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` on each decoder layer, then on ``model`` (the root: embeddings, final norm, LM head
    and any small heads). Call it on every process, and only when distributed.

    A trained model's root keeps its parameters gathered after the forward (FSDP2's rule for a root: the backward
    needs them at once), which is also where the fused losses read the LM head (:func:`gathered`). A ``frozen``
    model (a reference: forwards only, no backward to reshard it) reshards every module after each forward.
    ``offload`` keeps the sharded parameters, gradients and optimizer state on CPU (FSDP2's ``CPUOffloadPolicy``;
    the optimizer steps on CPU)."""
    fully_shard = _fully_shard()
    options = {}
    if offload:
        try:
            from torch.distributed.fsdp import CPUOffloadPolicy
        except ImportError:  # torch 2.4 / 2.5
            from torch.distributed._composable.fsdp import CPUOffloadPolicy
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, reshard_after_forward=True, **options)
    fully_shard(model, reshard_after_forward=frozen, **options)
    model.fastalign_root_reshards = frozen  # read back by gathered_for_generation when it restores the setting
    return model


def initialize_sharding(model) -> None:
    """Settle which FSDP2 module of ``model`` is the root before anything but the root's own forward runs.

    FSDP2 makes the first module whose forward runs the root; generation calls the inner causal LM, so a decoder
    layer would become a root and the next training forward would fail ("requires running forward through the
    root module first"). No-op for a plain or DDP model."""
    if is_sharded(model):
        model._get_fsdp_state()._lazy_init()  # what the root's first forward does; idempotent


def gathered(root, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (held in ``root``'s own FSDP2 parameter group: the LM head, a value head) with its full weights,
    for a fused loss that reads it after the root's forward.

    A trained root keeps its group gathered after the forward (see :func:`shard`), so this normally finds full
    weights; if they were resharded it all-gathers the root's group again (a collective: every process reads the
    head at the same point), and the backward reshards it as usual. For a plain or DDP model it returns
    ``module``."""
    if is_sharded(root) and any(_is_dtensor(p) for p in module.parameters()):
        root.unshard()
    return module


def full_state_dict(module: torch.nn.Module) -> dict:
    """``module.state_dict()`` with every FSDP2-sharded tensor all-gathered (a collective under FSDP2)."""
    return {k: v.full_tensor() if _is_dtensor(v) else v for k, v in module.state_dict().items()}


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DTensor
    return isinstance(t, DTensor)


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
