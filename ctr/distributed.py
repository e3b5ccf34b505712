"""TorchRec sharding: every embedding table into fbgemm's fused kernel, with its in-backward optimizer.

Used with a world of one process for local training (a gloo group over a file rendezvous) and by the
Ray workers with their own group. Also the bridge between sharded state (ShardedTensor) and the plain
tensors that checkpoints hold, so a checkpoint loads the same into a sharded or an unsharded model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
FUSED_KERNEL = "fused"


@contextmanager
def local_process_group() -> Iterator[None]:
    """A one-process gloo group, unless a group already exists (then it is reused, not destroyed)."""
    if dist.is_initialized():
        yield
        return
    # a fresh directory: gloo's file store may delete its file itself when the group goes away
    with tempfile.TemporaryDirectory(prefix="ctr-rendezvous-", ignore_cleanup_errors=True) as folder:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{folder}/store")
        try:
            yield
        finally:
            dist.destroy_process_group()


def embedding_collections(model: nn.Module) -> list[EmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]


def shard_model(model: nn.Module, sparse_optimizer: str, sparse_lr: float) -> DistributedModelParallel:
    """Plan every table table-wise into the fused kernel (even tiny ones, which the planner would
    otherwise make data-parallel with a separate, unfused update) and wrap in DMP."""
    collections = embedding_collections(model)
    for ebc in collections:
        apply_optimizer_in_backward(SPARSE_OPTIMIZERS[sparse_optimizer], ebc.parameters(), {"lr": sparse_lr})
    constraints = {
        table.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=[FUSED_KERNEL])
        for ebc in collections for table in ebc.embedding_bag_configs()
    }
    world = dist.get_world_size()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu", local_world_size=world),
                                       constraints=constraints)
    plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
    # the dense part needs DDP's gradient all-reduce only with more than one process; alone it is a copy
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, init_data_parallel=world > 1)


def _local(value: Any) -> Any:
    if isinstance(value, ShardedTensor):
        shards = value.local_shards()
        if len(shards) != 1 or list(shards[0].tensor.shape) != list(value.size()):
            raise NotImplementedError("plain-tensor state needs whole tables on this process (world size 1)")
        return shards[0].tensor
    return value


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Model state as plain, detached CPU tensors (whole tables)."""
    return {k: _local(v).detach().clone() for k, v in model.state_dict().items()}


def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Copy plain tensors into a (possibly sharded) model, in place; keys and shapes must match.
    ``partial``: keys the state lacks keep the model's own values (new modules of a later stage)."""
    current = model.state_dict()
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if (missing and not partial) or unexpected:
        raise KeyError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            target = _local(current[key])
            if target.shape != value.shape:
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, model {tuple(target.shape)}")
            target.copy_(value)


def fused_optimizer_state(model: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The fused embedding optimizer's per-row state (e.g. row-wise Adagrad sums), flattened."""
    state = model.fused_optimizer.state_dict()["state"]
    return {f"{param}/{name}": _local(t).detach().clone() for param, slots in state.items() for name, t in slots.items()
            if isinstance(t, (torch.Tensor, ShardedTensor))}


def load_fused_optimizer_state(model: DistributedModelParallel, saved: dict[str, torch.Tensor]) -> None:
    state = model.fused_optimizer.state_dict()["state"]
    with torch.no_grad():
        for param, slots in state.items():
            for name, t in slots.items():
                if isinstance(t, (torch.Tensor, ShardedTensor)):
                    _local(t).copy_(saved[f"{param}/{name}"])


def set_sparse_lr(model: DistributedModelParallel, lr: float) -> None:
    for group in model.fused_optimizer.param_groups:
        group["lr"] = lr
