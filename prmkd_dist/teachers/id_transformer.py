"""The large ID-based transformer teacher: the project's SASRec at several times the student's width and
depth (student: d=64, 2 layers; this teacher by default d=256, 4 layers, 4 heads), wrapped as a Teacher.
It needs no item text, so it is the neural teacher for catalogs without text (amazon-games)."""
from __future__ import annotations

from prmkd_dist.data.dataset import InteractionData
from prmkd_dist.models.sasrec import SASRec
from prmkd_dist.teachers.base import SequentialModelTeacher, register_teacher, seed_init


@register_teacher
class IDTransformerTeacher(SequentialModelTeacher):
    """SASRec(num_items, dim, max_len, num_layers, num_heads, dropout, ffn_dim) as a teacher; output tied
    to the item table, whose rows are ``item_embeddings()``."""

    kind = "id-transformer"

    def __init__(self, num_items: int, item_fingerprint: str, name: str | None = None, dim: int = 256,
                 max_len: int = 200, num_layers: int = 4, num_heads: int = 4, dropout: float = 0.2,
                 ffn_dim: int | None = None):
        super().__init__(num_items, item_fingerprint, name)
        self.model = SASRec(num_items, dim=dim, max_len=max_len, num_layers=num_layers, num_heads=num_heads,
                            dropout=dropout, ffn_dim=ffn_dim)

    def config(self) -> dict:
        return dict(self.model.hparams)

    @classmethod
    def from_data(cls, data: InteractionData, name: str | None = None, seed: int | None = None,
                  **hparams) -> "IDTransformerTeacher":
        """A fresh (untrained) teacher over ``data``'s items; ``seed`` (if given) seeds torch's RNG right
        before the network is built, so its initial weights depend on the seed alone (see ``seed_init``)."""
        seed_init(seed)
        return cls(data.num_items, data.fingerprint, name, **hparams)
