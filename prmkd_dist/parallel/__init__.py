"""Distributed training: TorchRec-sharded tables, DeepSpeed data parallelism for the dense part, the
catalog-parallel loss, resumable sharded checkpoints, and the distributed entry point.

- ``catalog_loss``: ``kd_loss_linear_catalog_parallel`` (the loss with the item table split by rows)
- ``sharding``: plan / shard / describe the students' EmbeddingCollections
- ``engine``: ``DistributedEngine`` (the trainer's Engine over a process group), ``ParallelConfig``
- ``checkpoint``: save / load / latest (DCP for tables, DeepSpeed files for the dense part)
- ``run``: ``python -m prmkd_dist.parallel.run --config FILE`` under torchrun or the deepspeed launcher

Submodules import TorchRec / DeepSpeed on use; this package import stays light.
"""
