"""``DistributedEngine``: TorchRec-sharded tables + the dense part under DeepSpeed data parallelism.

It implements the trainer's ``Engine`` protocol (``prmkd_dist.train.engine``) for a process group:

- **Tables** (every ``EmbeddingCollection`` of the student) are planned and sharded by TorchRec
  (``sharding.py``) and update *in backward* with a fused FBGEMM optimizer: their gradients never reach
  DeepSpeed. TorchRec's all-to-all routes each rank's lookup gradients to the rows' owners.
- **Dense part** (everything else) is replicated and handed to ``deepspeed.initialize`` (ZeRO 0/1/2, gloo
  on CPU, nccl on CUDA, gradient clipping on the dense parameters). ``step(loss)`` = ``engine.backward`` +
  ``engine.step``.
- **Loss over the catalog** (``linear_loss``): data parallelism gives each rank its own batch; the
  catalog-parallel loss (``kd_loss_linear_catalog_parallel`` with ``local_batch=True``) gathers the hidden
  rows and selected ids, scores every rank's rows against this rank's contiguous range of output rows, and
  evaluates the row formula for the rank's own rows only (the teacher scores and weights never travel).
  With ``parallel.scoring=sampled`` training steps use the sampled softmax instead (``_sampled_loss``,
  ``prmkd_dist.distill.sampled``): each rank looks up its rows' candidates and the step's shared negatives
  (the same set on every rank) through the sharded table, in a lookup of their own (a tied table then gets
  two fused updates a step, the history lookup's and the candidates'; for SGD the same as one with the sum),
  and no rank touches the rest of the catalog.

Gradient bookkeeping (why the result equals one process on the concatenated batch): the loss value is the
global-batch loss L on every rank; its gradient on rank r is dL w.r.t. rank r's own hidden rows, so its
dense gradient is a *partial sum* of dL/dtheta; DeepSpeed is therefore told to SUM (not average) the dense
gradients (``gradient_allreduce_op: sum``). Table rows get dL/dW from the catalog loss (whole gathered
batch) plus the lookup gradients routed by TorchRec, which are summed as well: both exact (TorchRec's
default division of those gradients by the world size is switched off).

**Output rows.** Each rank needs rows [first_id, first_id + R) of the output table with gradients into the
fused table. They are fetched by *looking them up* through the sharded table: with a tied output table
(SASRec, GRU4Rec) the ids are appended to the history lookup of the same forward (a forward pre-hook on
the sharded module), so one fused backward applies the lookup and output gradients in a single optimizer
update; with a separate output table (Caser) ``output_rows`` looks them up once per step. A row-wise table
scores each rank's own shard (the lookup stays local: no communication); a table-/column-wise table is
scored in even contiguous ranges (the rows travel through TorchRec's all-to-all, fine for small tables).

Caveats: every call that touches a table (forward, ``output_rows``, ``linear_loss``) runs collectives,
so all ranks must call them in lockstep; ``optim.grad_clip`` clips the dense parameters only (tables have
already been updated in backward when the global norm would be known).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor
from torchrec.distributed.comm_ops import set_gradient_division
from torchrec.sparse.jagged_tensor import JaggedTensor

from prmkd_dist.models.base import SequentialStudent
from prmkd_dist.parallel import sharding as sh
from prmkd_dist.train.engine import OutputRows

ZERO_STAGES = (0, 1, 2)
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class ParallelConfig:
    """The ``parallel`` section of a run config (read by ``prmkd_dist.parallel.run``)."""

    sharding: str = "auto"  # auto | row_wise | table_wise | column_wise (every table)
    tables: dict[str, Any] = field(default_factory=dict)  # per-table override: {"item": "column_wise"}
    zero_stage: int = 1  # DeepSpeed ZeRO stage of the dense part: 0, 1 or 2
    ds_config: str = ""  # optional DeepSpeed JSON (launch/ds_zero*.json); the engine sets the keys it owns
    table_optimizer: str = "adagrad"  # fused in-backward table optimizer: adagrad | rowwise_adagrad | sgd | adam (CUDA)
    dense_optimizer: str = "adam"  # optimizer of the dense part (a torch optimizer DeepSpeed wraps): adam | adamw | sgd
    table_lr: float = 0.0  # learning rate of the tables; 0 = optim.lr (Adagrad usually wants a larger one)
    backend: str = "auto"  # process-group backend: auto (gloo on CPU, nccl on CUDA) | gloo | nccl
    bf16: bool = False  # DeepSpeed bf16 for the dense part (CUDA only)
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: at the end of every epoch only)
    resume: bool = True  # continue from <out_dir>/dist_checkpoint/latest when it exists
    # training loss over the catalog: "full" (exact, the item table row-sharded: catalog_loss.py) or "sampled"
    # (sampled softmax with log-Q correction, prmkd_dist/distill/sampled.py: only the rows' candidates and
    # num_negatives shared negatives are looked up through the sharded table; for catalogs too large to score)
    scoring: str = "full"
    num_negatives: int = 1024  # draws per step of the shared negatives (sampled scoring)
    negatives: str = "uniform"  # their proposal: uniform | popularity (training counts ** 0.75)

    def problems(self) -> dict[str, str]:
        out = {}
        if self.sharding not in sh.SHARDING_TYPES:
            out["sharding"] = f"expected one of {sh.SHARDING_TYPES}"
        bad = {k: v for k, v in self.tables.items() if v not in sh.SHARDING_TYPES}
        if bad:
            out["tables"] = f"expected sharding types in {sh.SHARDING_TYPES}, got {bad}"
        if self.zero_stage not in ZERO_STAGES:
            out["zero_stage"] = f"expected one of {ZERO_STAGES}"
        if self.table_optimizer not in sh.TABLE_OPTIMIZERS:
            out["table_optimizer"] = f"expected one of {sorted(sh.TABLE_OPTIMIZERS)}"
        if self.backend not in ("auto", "gloo", "nccl"):
            out["backend"] = "expected auto, gloo or nccl"
        if self.dense_optimizer not in DENSE_OPTIMIZERS:
            out["dense_optimizer"] = f"expected one of {sorted(DENSE_OPTIMIZERS)}"
        if self.table_lr < 0:
            out["table_lr"] = "expected a value >= 0"
        if self.checkpoint_every < 0:
            out["checkpoint_every"] = "expected a value >= 0"
        if self.scoring not in ("full", "sampled"):
            out["scoring"] = "expected full or sampled"
        if self.num_negatives < 1:
            out["num_negatives"] = "expected a value >= 1"
        if self.negatives not in ("uniform", "popularity"):
            out["negatives"] = "expected uniform or popularity"
        return out


# ---- gathering the per-rank batches -----------------------------------------------------------------
# ---- DeepSpeed configuration ------------------------------------------------------------------------
def deepspeed_config(pcfg: ParallelConfig, lr: float, grad_clip: float, micro_batch: int,
                     device: torch.device) -> dict:
    """The DeepSpeed config: ``pcfg.ds_config`` (if any) with the keys this engine owns set from the run
    config. ``gradient_allreduce_op`` is always "sum" (see the module doc), ``gradient_accumulation_steps``
    always 1 (the trainer steps every batch)."""
    cfg: dict = {}
    if pcfg.ds_config:
        with open(pcfg.ds_config) as f:
            cfg = json.load(f)
    cfg = copy.deepcopy(cfg)
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world
    cfg["gradient_accumulation_steps"] = 1
    cfg.setdefault("zero_optimization", {})
    if not pcfg.ds_config:
        cfg["zero_optimization"]["stage"] = pcfg.zero_stage
    cfg["gradient_clipping"] = float(grad_clip)
    cfg["gradient_allreduce_op"] = "sum"
    cfg["zero_allow_untested_optimizer"] = True  # the client optimizer is torch.optim.Adam
    cfg.setdefault("steps_per_print", 1 << 30)
    cfg.setdefault("wall_clock_breakdown", False)
    if pcfg.bf16:
        if device.type != "cuda":
            raise ValueError("parallel.bf16 needs CUDA; on CPU the dense part trains in float32")
        cfg["bf16"] = {"enabled": True}
    for key in ("fp16", "optimizer", "scheduler"):
        if key in cfg and (key != "fp16" or cfg[key].get("enabled")):
            raise ValueError(f"{pcfg.ds_config}: '{key}' is set by the run config here (optim.*, parallel.bf16); remove it")
    return cfg


class _DenseParameters(nn.Module):
    """The replicated parameters of the student, as the module DeepSpeed manages (its forward is never
    called: the trainer runs the student itself). Holds the same Parameter objects as the student."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        super().__init__()
        self.names = [n for n, _ in named]
        self.params = nn.ParameterList([p for _, p in named])


def _default_group_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- the engine -------------------------------------------------------------------------------------
class DistributedEngine:
    """The trainer's Engine over a process group (module doc). ``model`` is the unsharded student, built
    identically on every rank (same seed): its table rows are copied into the shards.

    ``optim_cfg`` needs ``lr``, ``weight_decay``, ``grad_clip``, ``batch_size`` (a ``TrainConfig.optim``).
    """

    def __init__(self, model: SequentialStudent, optim_cfg, parallel_cfg: ParallelConfig | None = None,
                 process_group: dist.ProcessGroup | None = None, device: torch.device | str | None = None):
        import deepspeed

        if not dist.is_initialized():
            raise RuntimeError("DistributedEngine needs an initialised torch.distributed process group")
        pcfg = parallel_cfg or ParallelConfig()
        problems = pcfg.problems()
        if problems:
            raise ValueError(f"parallel config: {problems}")
        self.group = process_group if process_group is not None else dist.GroupMember.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.device = torch.device(device) if device is not None else _default_group_device(self.group)
        self.num_items = model.num_items
        self.parallel_cfg = pcfg

        # what scores the catalog: "table" (tied: the input table, Caser: its own output table), "computed"
        # (LightGCN: output_weight() computed from the tables; this rank scores a slice of it), "none" (DeepFM,
        # DCN-v2: pairwise scorers; this rank scores its range of items with model.score_items)
        self.catalog_output = getattr(model, "catalog_output", "table")
        self.tied = self.catalog_output == "table" and model.output_weight() is model.item_table_weight()
        out_path = out_table = out_feature = None
        if self.catalog_output == "table":
            out_path, out_table, out_feature = self._find_output_table(model)
        self.out_path, self.out_table, self.out_feature = out_path, out_table, out_feature
        self.needs_users = getattr(model, "needs_users", False)

        # (name, feature, rows) of every table, by module path: the sharded modules do not keep the configs
        self.table_configs = {path: [(c.name, c.feature_names[0], c.num_embeddings) for c in sh.table_configs(ec)]
                              for path, ec in sh.embedding_collections(model).items()}
        self.bag_tables = {path for path, ec in sh.embedding_collections(model).items()
                           if type(ec).__name__ == "EmbeddingBagCollection"}
        # TorchRec divides the gradients of its all-to-alls by the world size (it assumes per-rank mean losses
        # averaged like DDP); our loss is already the global-batch loss on every rank: no division.
        # (A process-wide switch: every engine in this process uses the same convention.)
        set_gradient_division(False)
        sh.attach_table_optimizer(model, pcfg.table_optimizer, self.device.type,
                                  **self._table_optim_kwargs(pcfg, optim_cfg))
        self.plan = sh.plan_sharding(model, self.world_size, self.group, pcfg.sharding, pcfg.tables,
                                     compute_device=self.device.type)
        self.dmp = sh.shard_model(model, self.plan, self.group, self.device)
        self.model: SequentialStudent = self.dmp.module  # type: ignore[assignment]
        self.first_id, self.num_rows = self._scoring_range()
        self._out_ec = self.model.get_submodule(out_path) if out_path is not None else None
        self._stash: OutputRows | None = None
        self._piggyback_rows = 0
        # sampled scoring: the proposal of the shared negatives and the number of sets drawn so far (the same on
        # every rank: every rank draws once per training loss; a checkpoint keeps the count, see run.py)
        self.negative_proposal = None
        self.negative_draws = 0
        if pcfg.scoring == "sampled" and self.catalog_output != "table":
            raise ValueError(f"parallel.scoring=sampled needs an output item table; {type(model).__name__} scores "
                             f"the catalog {'from computed rows' if self.catalog_output == 'computed' else 'pairwise'}")
        if self.tied:
            self._out_ec.register_forward_pre_hook(self._append_output_ids)
            self._out_ec.register_forward_hook(self._split_output_rows)

        dense = sh.dense_parameters(self.dmp)
        self.dense_module = _DenseParameters(dense)
        optimizer = DENSE_OPTIMIZERS[pcfg.dense_optimizer](self.dense_module.parameters(), lr=optim_cfg.lr,
                                                           weight_decay=optim_cfg.weight_decay)
        self.ds_config = deepspeed_config(pcfg, optim_cfg.lr, optim_cfg.grad_clip, optim_cfg.batch_size, self.device)
        self.ds, _, _, _ = deepspeed.initialize(model=self.dense_module, optimizer=optimizer, config=self.ds_config,
                                                dist_init_required=False)

    # --- setup helpers -----------------------------------------------------------------------------
    @staticmethod
    def _table_optim_kwargs(pcfg: ParallelConfig, optim_cfg) -> dict:
        kw = {"lr": pcfg.table_lr or optim_cfg.lr}
        if pcfg.table_optimizer != "sgd" and optim_cfg.weight_decay:
            kw["weight_decay"] = optim_cfg.weight_decay
        return kw

    @staticmethod
    def _find_output_table(model: SequentialStudent) -> tuple[str, str, str]:
        w = model.output_weight()
        for path, ec in sh.embedding_collections(model).items():
            for cfg in ec.embedding_configs():
                if ec.embeddings[cfg.name].weight is w:
                    return path, cfg.name, cfg.feature_names[0]
        raise ValueError(f"{type(model).__name__}.output_weight() is not a table of one of its EmbeddingCollections; "
                         "the distributed engine scores the catalog through a sharded table")

    def _scoring_range(self) -> tuple[int, int]:
        """This rank's contiguous output rows: its own shard for a row-wise table, an even split otherwise."""
        shards = [s for s in sh.plan_shards(self.plan) if s.module == self.out_path and s.table == self.out_table]
        if shards and shards[0].sharding_type == "row_wise":
            mine = [s for s in shards if s.rank == self.rank]
            return (mine[0].row_lo, mine[0].row_hi - mine[0].row_lo) if mine else (self.num_items, 0)
        block = -(-self.num_items // self.world_size)
        lo = min(self.rank * block, self.num_items)
        return lo, min(lo + block, self.num_items) - lo

    def _local_ids(self) -> Tensor:
        return torch.arange(self.first_id, self.first_id + self.num_rows, device=self.device, dtype=torch.int64)

    # --- tied tables: the output rows ride along with the history lookup ---------------------------
    def _append_output_ids(self, module, args):
        # (sampled scoring looks up only the step's candidates and negatives, in linear_loss: no full rows here)
        if not self.model.training or not torch.is_grad_enabled() or self.parallel_cfg.scoring == "sampled":
            self._piggyback_rows = -1
            return None
        (kjt,) = args
        if kjt.keys() != [self.out_feature]:
            raise ValueError(f"expected a lookup of feature {self.out_feature!r}, got keys {kjt.keys()}")
        self._piggyback_rows = self.num_rows
        lengths = torch.cat([kjt.lengths(), torch.tensor([self.num_rows], dtype=kjt.lengths().dtype)])
        values = torch.cat([kjt.values(), self._local_ids().to(kjt.values().dtype)])
        return (KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=values, lengths=lengths),)

    def _split_output_rows(self, module, args, output):
        if self._piggyback_rows < 0:
            return None
        jt = output[self.out_feature]
        values, lengths = jt.values(), jt.lengths()
        n = values.shape[0] - self._piggyback_rows
        self._stash = self._make_rows(values[n:])
        return {self.out_feature: JaggedTensor(values=values[:n], lengths=lengths[:-1])}

    def _make_rows(self, weight: Tensor) -> OutputRows:
        b = self.model.output_bias()
        bias = b[self.first_id:self.first_id + self.num_rows] if b is not None else None
        return OutputRows(weight, bias, self.first_id, self.num_items)

    # --- Engine protocol ---------------------------------------------------------------------------
    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def output_rows(self) -> OutputRows:
        """This rank's output rows (``first_id`` .. ``first_id + R - 1``). In training with a tied table,
        the rows looked up with this step's histories; otherwise one lookup now (a collective: every rank
        calls it). Differentiable into the fused table when grad is enabled."""
        if self.catalog_output == "computed":  # inside the objective's propagation: no new lookup
            return self._make_rows(self.model.output_weight()[self.first_id:self.first_id + self.num_rows])
        if self.catalog_output == "none":
            raise ValueError(f"{type(self.model).__name__} scores (user, item) pairs: it has no output item table "
                             "(its objective is the candidate-set loss, distill/interaction.py)")
        if self._stash is not None:
            return self._stash
        ids = self._local_ids()
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[self.out_feature], values=ids,
                                                  lengths=torch.tensor([ids.numel()], dtype=torch.int32))
        weight = self._out_ec(kjt)[self.out_feature].values()
        rows = self._make_rows(weight)
        if torch.is_grad_enabled() and self.model.training:
            self._stash = rows  # one lookup per step: a second one would apply a second fused update
        return rows

    def linear_loss(self, hidden: Tensor, target: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                    teacher_weights: Tensor, rank_weights: Tensor | None = None, **loss_kwargs) -> Tensor:
        """The full-catalog loss of the global batch (all ranks' rows in rank order): the same value on every rank,
        the mean over the global batch as one process on the concatenated batch would compute it; its gradient
        flows into this rank's ``hidden`` rows (and the rank's output rows). ``reduction="none"``: this rank's
        rows only. With ``parallel.scoring=sampled``, training steps use sampled partitions instead
        (:meth:`_sampled_loss`); evaluation and no-grad calls stay exact."""
        from prmkd_dist.parallel.catalog_loss import kd_loss_linear_catalog_parallel

        if self.parallel_cfg.scoring == "sampled" and self.model.training and torch.is_grad_enabled():
            return self._sampled_loss(hidden, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                                      **loss_kwargs)
        rows = self.output_rows()
        return kd_loss_linear_catalog_parallel(hidden, rows.weight, rows.first_id, rows.num_items, target, teacher_ids,
                                               teacher_scores, teacher_weights, rank_weights, item_bias_shard=rows.bias,
                                               group=self.group, local_batch=True, **loss_kwargs)

    def lookup_items(self, ids: Tensor) -> Tensor:
        """The output table's rows of ``ids`` [n] (any ids, on any rank) through the sharded TorchRec lookup:
        [n, d], differentiable into the fused table (its rows get their own in-backward update). Collective."""
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[self.out_feature], values=ids.to(torch.int64),
                                                  lengths=torch.tensor([ids.numel()], dtype=torch.int32))
        return self._out_ec(kjt)[self.out_feature].values()

    def sample_negatives(self) -> tuple[Tensor, Tensor]:
        """This step's shared negatives (sorted distinct ids, log inclusion probabilities): the same set on every
        rank, the ``negative_draws``-th of the run."""
        from prmkd_dist.distill.sampled import negative_generator, negative_proposal, sample_negatives

        if self.negative_proposal is None:
            self.negative_proposal = negative_proposal(self.num_items)
        gen = negative_generator(self.negative_draws)
        self.negative_draws += 1
        return sample_negatives(self.negative_proposal, self.parallel_cfg.num_negatives, gen)

    def _sampled_loss(self, hidden: Tensor, target: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                      teacher_weights: Tensor, rank_weights: Tensor | None = None, *, reduction: str = "mean",
                      backend: str = "auto", **loss_kwargs) -> Tensor:
        """``linear_loss`` with sampled partitions (``parallel.scoring=sampled``): each rank looks up its rows'
        candidates (target + teacher ids) and the step's shared negatives through the sharded table, evaluates
        its rows (prmkd_dist/distill/sampled.py) and returns the global-batch loss, as the exact path does."""
        from prmkd_dist.distill.sampled import kd_loss_sampled, selected_ids

        neg_ids, log_p = self.sample_negatives()
        cand = selected_ids(target, teacher_ids)
        b, m = cand.shape
        # each distinct id looked up once (rows repeat across a batch's lists: fewer rows fetched and updated),
        # then spread to the slots; the gradient of a row is summed over its slots by the indexing's backward
        # (two gathers rather than one sliced: a slice's backward would zero-fill the whole [b * m + N, d])
        wanted = torch.cat([cand.clamp_min(0).reshape(-1), neg_ids.to(cand.device)])
        uniq, inverse = torch.unique(wanted, return_inverse=True)
        rows = self.lookup_items(uniq)
        cand_emb, neg_emb = rows[inverse[:b * m]].view(b, m, -1), rows[inverse[b * m:]]
        bias = self.model.output_bias()
        cand_bias = bias[cand.clamp_min(0)] if bias is not None else None
        neg_bias = bias[neg_ids] if bias is not None else None
        losses = kd_loss_sampled(hidden, cand_emb.to(hidden.dtype), neg_emb.to(hidden.dtype), neg_ids, log_p,
                                 self.num_items, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                                 cand_bias=cand_bias, neg_bias=neg_bias, reduction="none", backend=backend,
                                 **loss_kwargs)
        if reduction == "none":
            return losses
        total_rows = torch.tensor([float(b)], dtype=torch.float64, device=hidden.device)
        dist.all_reduce(total_rows, group=self.group)
        share = losses.sum() / (float(total_rows) if reduction == "mean" else 1.0)
        total = share.detach().clone()
        dist.all_reduce(total, group=self.group)  # the global-batch value on every rank; the gradient is the share's
        return share + (total - share.detach())

    def step(self, loss: Tensor) -> None:
        """Backward (tables update inside it), DeepSpeed's gradient reduction and dense step, zeroing."""
        self._stash = None
        self.ds.backward(loss)
        self.ds.step()

    # --- scoring for evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def local_scores(self, history: Tensor, users: Tensor | None = None) -> Tensor:
        """[B, R] scores of the next item over this rank's output rows (ids first_id..first_id + R - 1).
        Collective; used by the sharded evaluation. ``users``: the rows' user ids (data-bound students)."""
        if self.catalog_output == "none":
            return self.model.score_items(history, users, self._local_ids())
        if self.catalog_output == "computed":
            with self.model.propagation():
                u = self.model.user_embedding(history, users)
                rows = self.output_rows()
            return u @ rows.weight.T
        u = self.model.user_embedding(history)
        rows = self.output_rows()
        s = u @ rows.weight.T
        return s if rows.bias is None else s + rows.bias

    # --- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Sharded model + table optimizer state (ShardedTensors: save with torch.distributed.checkpoint)
        and this rank's DeepSpeed optimizer state (``checkpoint.py`` uses DeepSpeed's own files instead)."""
        return {"model": self.dmp.state_dict(), "table_optimizer": self.dmp.fused_optimizer.state_dict(),
                "dense_optimizer": self.ds.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dmp.load_state_dict(state["model"])
        self.dmp.fused_optimizer.load_state_dict(state["table_optimizer"])
        if "dense_optimizer" in state:
            self.ds.optimizer.load_state_dict(state["dense_optimizer"])

    def dense_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self.dense_module.names, self.dense_module.params))


def init_process_group(backend: str = "auto") -> tuple[int, int, int]:
    """Initialise the default group from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT: torchrun and the deepspeed launcher both set them). Returns (rank, world,
    local_rank); a no-op when already initialised."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if not dist.is_initialized():
        if missing:
            raise RuntimeError(f"environment variables {missing} are not set: start this under torchrun or the "
                               "deepspeed launcher (see launch/)")
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart == 0:
            dist.init_process_group(backend)
        else:
            # after a torchrun restart the rendezvous store still holds the previous attempt's gloo/nccl
            # addresses under the same keys: the new group would connect to dead peers. Fresh key space:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=rank == 0 and not agent_store)
            dist.init_process_group(backend, store=dist.PrefixStore(f"prmkd/attempt_{restart}", store),
                                    rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def exit_after_process_group(code: int = 0) -> None:
    """End a finished rank: wait for every peer, destroy all process groups, flush, and leave with
    ``os._exit(code)``, skipping the interpreter's own teardown.

    Why: two CI runs of the 2-rank gloo tests (TorchRec-sharded models, once with DeepSpeed) had a rank abort
    with "terminate called without an active exception" (SIGABRT, so torchrun reports the job failed) after
    its work was done; it was not reproduced in 22 local runs, loaded or not. That message is a C++
    ``std::thread`` destroyed while joinable, which at exit means a library's background thread outliving
    finalization (PyTorch discusses the same for gloo work objects at interpreter teardown). Every output
    of the run is written before this is called, and nothing after it has work to do."""
    import logging
    import sys

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)

