"""TorchRec sharding: every embedding table into fbgemm's fused kernel, with its in-backward optimizer.

Used with a world of one process for local training (a gloo group over a file rendezvous) and by the
Ray workers with their own group (gloo on CPU, NCCL on GPU). Also the bridge between sharded state
(ShardedTensor) and the plain tensors that checkpoints hold: saving gathers whole tables on rank 0,
loading copies each rank's shards out of the whole tables, so one checkpoint loads the same into a
model sharded over any number of ranks, or into an unsharded one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

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
CPU = torch.device("cpu")
# what TorchRec's fused embedding kernel can be sharded as, per device type, over several ranks
SHARDING_TYPES: dict[str, list[ShardingType]] = {
    "cpu": [ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE],
    "cuda": [ShardingType.TABLE_WISE, ShardingType.COLUMN_WISE, ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE],
}


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


def shard_model(model: nn.Module, sparse_optimizer: str, sparse_lr: float, device: torch.device = CPU,
                local_world_size: int | None = None) -> DistributedModelParallel:
    """Plan every table into the fused kernel (even tiny ones, which the planner would otherwise make
    data-parallel with a separate, unfused update) and wrap in DMP. Alone: table-wise. Over several
    ranks: the sharding types TorchRec's fused kernel supports on the device (table-wise and
    column-wise on CPU; row-wise variants too on GPU), the planner choosing per table."""
    collections = embedding_collections(model)
    for ebc in collections:
        apply_optimizer_in_backward(SPARSE_OPTIMIZERS[sparse_optimizer], ebc.parameters(), {"lr": sparse_lr})
    world = dist.get_world_size()
    types = [ShardingType.TABLE_WISE] if world == 1 else SHARDING_TYPES[device.type]
    constraints = {
        table.name: ParameterConstraints(sharding_types=[t.value for t in types], compute_kernels=[FUSED_KERNEL])
        for ebc in collections for table in ebc.embedding_bag_configs()
    }
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=local_world_size or world)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
    # the dense part needs DDP's gradient all-reduce only with more than one process; alone it is a copy
    return DistributedModelParallel(model, device=device, plan=plan, init_data_parallel=world > 1)


def sharding_summary(model: DistributedModelParallel) -> dict[str, dict[str, object]]:
    """Table -> how the planner sharded it and which ranks hold it (written to the run directory)."""
    return {f"{module}.{table}": {"sharding_type": p.sharding_type, "compute_kernel": p.compute_kernel,
                                  "ranks": list(p.ranks or [])}
            for module, params in model.plan.plan.items() for table, p in params.items()}


def _gather_whole(entries: dict[str, torch.Tensor | ShardedTensor]) -> dict[str, torch.Tensor]:
    """Whole CPU tensors on rank 0 ({} elsewhere): every rank sends rank 0 its local shards with their
    offsets, rank 0 places them. Collective; works whether a rank lists every sharded entry (model
    state) or only those it holds shards of (the fused optimizer's state)."""
    whole = {k: v.detach().cpu().clone() for k, v in entries.items() if not isinstance(v, ShardedTensor)}
    pieces = {k: (tuple(v.size()), v.dtype, [(s.metadata.shard_offsets, s.tensor.detach().cpu()) for s in v.local_shards()])
              for k, v in entries.items() if isinstance(v, ShardedTensor)}
    world, rank = dist.get_world_size(), dist.get_rank()
    every = [pieces]
    if world > 1:
        every = [{} for _ in range(world)] if rank == 0 else None
        dist.gather_object(pieces, every, dst=0)
    if rank != 0:
        return {}
    for part in every:
        for key, (size, dtype, shards) in part.items():
            out = whole.setdefault(key, torch.zeros(size, dtype=dtype))
            for offsets, tensor in shards:
                out[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
    return dict(sorted(whole.items()))


def _copy_into(target: torch.Tensor | ShardedTensor, whole: torch.Tensor) -> None:
    if not isinstance(target, ShardedTensor):
        target.copy_(whole)
        return
    for shard in target.local_shards():
        md = shard.metadata
        shard.tensor.copy_(whole[tuple(slice(o, o + n) for o, n in zip(md.shard_offsets, md.shard_sizes))])


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Model state as plain CPU tensors (whole tables). Collective over the ranks: the state is
    returned on rank 0; other ranks get an empty dict."""
    return _gather_whole(model.state_dict())


def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Copy plain tensors into a (possibly sharded) model, in place, each rank taking its shards;
    keys and shapes must match. ``partial``: keys the state lacks keep the model's own values (new
    modules of a later stage)."""
    current = model.state_dict()
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if (missing and not partial) or unexpected:
        raise KeyError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            target = current[key]
            shape = target.size() if isinstance(target, ShardedTensor) else target.shape
            if tuple(shape) != tuple(value.shape):
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, model {tuple(shape)}")
            _copy_into(target, value)


def _optimizer_slots(model: DistributedModelParallel) -> dict[str, torch.Tensor | ShardedTensor]:
    state = model.fused_optimizer.state_dict()["state"]
    return {f"{param}/{name}": t for param, slots in state.items() for name, t in slots.items()
            if isinstance(t, (torch.Tensor, ShardedTensor))}


def fused_optimizer_state(model: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The fused embedding optimizer's per-row state (e.g. row-wise Adagrad sums), flattened; like
    ``plain_state_dict``, collective, and whole on rank 0 only."""
    return _gather_whole(_optimizer_slots(model))


def load_fused_optimizer_state(model: DistributedModelParallel, saved: dict[str, torch.Tensor]) -> None:
    """Each rank copies its shards' part of the whole saved state."""
    with torch.no_grad():
        for key, t in _optimizer_slots(model).items():
            _copy_into(t, saved[key])


def set_sparse_lr(model: DistributedModelParallel, lr: float) -> None:
    for group in model.fused_optimizer.param_groups:
        group["lr"] = lr
