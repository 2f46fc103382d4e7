"""Sharding the student's TorchRec tables over a process group: plan, wrap, describe.

Every ``EmbeddingCollection`` (and ``EmbeddingBagCollection``: DeepFM / DCN-v2 fields) of a student (the item
table ``item``; Caser's output table ``item_out``) is
planned by TorchRec's ``EmbeddingShardingPlanner`` and wrapped by ``DistributedModelParallel`` with
``init_data_parallel=False``: the tables become sharded modules, every other parameter stays an ordinary
replicated parameter that the caller hands to its data-parallel engine (DeepSpeed, ``engine.py``).

Sharding types (``sharding``, per table overridable): ``"auto"`` lets the planner choose among the
model-parallel types (row-, table-, column-wise); ``"row_wise"``, ``"table_wise"``, ``"column_wise"`` force
one through ``ParameterConstraints``. Data-parallel tables are never planned: their gradients would have
to be averaged by the dense engine, which is exactly what sharded tables avoid.

The tables update in backward: ``apply_optimizer_in_backward`` attaches the optimizer to the table
parameters before sharding, TorchRec turns it into FBGEMM's fused table optimizer (FUSED compute kernel),
so a table's gradient is applied inside the lookup's backward and never materialised as a ``.grad``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec import optim as trec_optim
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

SHARDING_TYPES = ("auto", "row_wise", "table_wise", "column_wise")
_MODEL_PARALLEL = [ShardingType.ROW_WISE.value, ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value]
# FBGEMM's fused CPU tables support exact SGD / Adagrad / row-wise Adagrad only; Adam needs CUDA
TABLE_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
                    "rowwise_adagrad": trec_optim.RowWiseAdagrad}
CPU_TABLE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


class ShardingConfigError(ValueError):
    """An unknown sharding type, table name or table optimizer."""


@dataclass(frozen=True)
class TableShard:
    """One shard of a table: global rows [row_lo, row_hi) and columns [col_lo, col_hi) on ``rank``."""

    module: str  # path of the EmbeddingCollection in the model ("item_ec")
    table: str
    sharding_type: str
    compute_kernel: str
    rank: int
    row_lo: int
    row_hi: int
    col_lo: int
    col_hi: int


def embedding_collections(model: nn.Module) -> dict[str, EmbeddingCollection | EmbeddingBagCollection]:
    """{module path: EmbeddingCollection or EmbeddingBagCollection} of the (unsharded) model (the bag
    collections hold the feature-interaction students' fields)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection))}


def table_configs(ec: nn.Module) -> list:
    """The table configs of an EmbeddingCollection or an EmbeddingBagCollection."""
    return ec.embedding_bag_configs() if isinstance(ec, EmbeddingBagCollection) else ec.embedding_configs()


def sharders() -> list:
    return [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]


def table_names(model: nn.Module) -> list[str]:
    return [cfg.name for ec in embedding_collections(model).values() for cfg in table_configs(ec)]


def _table_dims(model: nn.Module) -> dict[str, int]:
    return {cfg.name: cfg.embedding_dim for ec in embedding_collections(model).values() for cfg in table_configs(ec)}


def sharding_constraints(model: nn.Module, sharding: str = "auto", per_table: dict[str, str] | None = None,
                         world_size: int = 1) -> dict[str, ParameterConstraints]:
    """ParameterConstraints that restrict each table to one sharding type (``per_table`` overrides
    ``sharding``), or to the model-parallel types for "auto". A forced column-wise table may be cut into
    ``world_size`` column blocks (the planner's default minimum block would keep a narrow table whole)."""
    per_table = dict(per_table or {})
    names = table_names(model)
    unknown = sorted(set(per_table) - set(names))
    if unknown:
        raise ShardingConfigError(f"per-table sharding names unknown tables {unknown}; the model's tables: {names}")
    out = {}
    for name in names:
        kind = per_table.get(name, sharding)
        if kind not in SHARDING_TYPES:
            raise ShardingConfigError(f"table {name!r}: sharding {kind!r}; expected one of {SHARDING_TYPES}")
        kw = {}
        if kind == "column_wise" and world_size > 1:
            kw["min_partition"] = max(4, _table_dims(model)[name] // world_size)  # FBGEMM widths: multiples of 4
        out[name] = ParameterConstraints(sharding_types=list(_MODEL_PARALLEL) if kind == "auto" else [kind], **kw)
    return out


def plan_sharding(model: nn.Module, world_size: int, group: dist.ProcessGroup | None = None,
                  sharding: str = "auto", per_table: dict[str, str] | None = None,
                  compute_device: str = "cpu") -> ShardingPlan:
    """Plan every table of ``model`` over ``world_size`` ranks. With an initialised process group the plan
    is made on rank 0 and broadcast (every rank must call); without one (``group=None`` and no default
    group) it is computed locally, which is how tests inspect plans for other world sizes."""
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=compute_device),
        constraints=sharding_constraints(model, sharding, per_table, world_size),
    )
    if dist.is_available() and dist.is_initialized():
        return planner.collective_plan(model, sharders(), group if group is not None else dist.GroupMember.WORLD)
    return planner.plan(model, sharders())


def plan_shards(plan: ShardingPlan) -> list[TableShard]:
    """Every shard of every table in ``plan``, in plan order."""
    out = []
    for module, params in plan.plan.items():
        for table, ps in params.items():
            for md in ps.sharding_spec.shards:
                (r0, c0), (nr, nc) = md.shard_offsets, md.shard_sizes
                out.append(TableShard(module, table, ps.sharding_type, ps.compute_kernel, md.placement.rank(),
                                      r0, r0 + nr, c0, c0 + nc))
    return out


def describe_plan(plan: ShardingPlan) -> str:
    """The plan as a table: one line per shard (table, sharding type, kernel, rank, rows, columns)."""
    lines = ["table | module | sharding | kernel | rank | rows | cols", "--- | --- | --- | --- | --- | --- | ---"]
    for s in plan_shards(plan):
        lines.append(f"{s.table} | {s.module} | {s.sharding_type} | {s.compute_kernel} | {s.rank} | "
                     f"[{s.row_lo}, {s.row_hi}) | [{s.col_lo}, {s.col_hi})")
    return "\n".join(lines)


def attach_table_optimizer(model: nn.Module, name: str = "adagrad", compute_device: str = "cpu", **kwargs) -> None:
    """Attach an in-backward optimizer to every table parameter (before sharding: TorchRec fuses it
    into the FBGEMM table kernel). ``kwargs`` go to the torch optimizer (lr, eps, weight_decay, ...)."""
    if name not in TABLE_OPTIMIZERS:
        raise ShardingConfigError(f"table optimizer {name!r}; expected one of {sorted(TABLE_OPTIMIZERS)}")
    if compute_device == "cpu" and name not in CPU_TABLE_OPTIMIZERS:
        raise ShardingConfigError(f"table optimizer {name!r} has no fused CPU kernel in FBGEMM; on CPU use one of "
                                  f"{CPU_TABLE_OPTIMIZERS}")
    params = [p for ec in embedding_collections(model).values() for p in ec.parameters()]
    apply_optimizer_in_backward(TABLE_OPTIMIZERS[name], params, kwargs)


def shard_model(model: nn.Module, plan: ShardingPlan, group: dist.ProcessGroup | None = None,
                device: torch.device | str = "cpu") -> DistributedModelParallel:
    """Wrap ``model`` so its tables are sharded by ``plan`` (weights copied from the unsharded tables);
    the dense part is left alone (``init_data_parallel=False``) for the caller's data-parallel engine.
    Attach the table optimizer first (``attach_table_optimizer``)."""
    pg = group if group is not None else dist.GroupMember.WORLD
    env = ShardingEnv.from_process_group(pg)
    return DistributedModelParallel(model, env=env, plan=plan, sharders=sharders(),
                                    device=torch.device(device), init_data_parallel=False)


def sharded_module_names(dmp: DistributedModelParallel) -> list[str]:
    """Paths (inside ``dmp.module``) of the sharded table modules."""
    from torchrec.distributed.types import ShardedModule

    return [n for n, m in dmp.module.named_modules() if isinstance(m, ShardedModule)]


def dense_parameters(dmp: DistributedModelParallel) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that is not inside a sharded table module: the replicated part."""
    sharded = sharded_module_names(dmp)
    return [(n, p) for n, p in dmp.module.named_parameters()
            if not any(n == s or n.startswith(s + ".") for s in sharded)]
