import numpy as np
import pytest
import torch

from prmkd_dist.data.shards import ShardMeta, TeacherInfo, write_teacher_embeddings
from prmkd_dist.distill.embedding import (ItemTableExtension, bake, extend_items, is_tied,
                                          load_teacher_item_embeddings)
from prmkd_dist.distill.trainer import train_distilled
from prmkd_dist.models import build_student
from prmkd_dist.train.evaluate import evaluate
from prmkd_dist.train.trainer import load_checkpoint

from .test_distill_trainer import (distill_cfg, embeddings, random_init_ndcg, shards,  # noqa: F401  (fixtures)
                                   small_split, svd_item_embeddings)


def extended(name: str, split, teacher: torch.Tensor, **hp):
    torch.manual_seed(0)
    student = build_student(name, split.data.num_items, **{"dim": 16, "max_len": 10, "dropout": 0.0, **hp})
    return extend_items(student, ItemTableExtension(16, is_tied(student), teacher))


def test_loaded_embeddings_are_scaled_and_missing_items_counted(small_split, tmp_path):
    c = small_split.data.num_items
    emb = svd_item_embeddings(small_split, 8)
    have = np.arange(0, c, 2)  # a teacher that only knows every second item
    meta = ShardMeta(c, small_split.data.fingerprint, (TeacherInfo("half", 1, "similarity"),), kind="embeddings",
                     embedding_dim=8)
    write_teacher_embeddings(str(tmp_path / "half"), meta, have, emb[have])
    table, report = load_teacher_item_embeddings([str(tmp_path / "half")], c, small_split.data.fingerprint)
    assert table.shape == (c, 8) and report["half"]["items_missing"] == c - len(have)
    assert (table[1::2] == 0).all()
    assert table[have].norm(dim=1).mean().item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("name", ["sasrec", "caser"])
def test_gradients_reach_the_projection_not_the_frozen_teacher(small_split, name):
    teacher = torch.from_numpy(svd_item_embeddings(small_split, 8))
    hp = {"max_len": 3} if name == "caser" else {}
    model = extended(name, small_split, teacher, **hp)
    ext = model.item_ext
    assert not ext.teacher.requires_grad and all(p is not ext.teacher for p in model.parameters())
    assert ("item_ext.teacher" not in model.state_dict())  # frozen, rebuilt from the shards
    hist = torch.tensor([[-1, 5, 9, 2], [1, 2, 3, 4]])
    loss = torch.nn.functional.cross_entropy(model.score(hist), torch.tensor([7, 8]))
    loss.backward()
    assert ext.proj_in[-1].weight.grad.abs().sum() > 0  # zero-initialised, yet it learns
    assert model.item_table_weight().grad.abs().sum() > 0  # the student's own TorchRec table still trains
    assert ext.teacher.grad is None
    if name == "caser":  # untied output: its own projection
        assert not is_tied(model) and ext.proj_out[-1].weight.grad.abs().sum() > 0
    else:
        assert is_tied(model) and ext.proj_out is None


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "caser"])
def test_bake_gives_a_plain_student_with_the_same_scores(small_split, name):
    teacher = torch.from_numpy(svd_item_embeddings(small_split, 8))
    hp = {"max_len": 3} if name == "caser" else {}
    model = extended(name, small_split, teacher, **hp)
    with torch.no_grad():  # a trained-looking projection (it starts at 0)
        for p in model.item_ext.parameters():
            p.normal_(std=0.3)
    plain = bake(model)
    assert type(plain).__name__ != type(model).__name__ and not hasattr(plain, "item_ext")
    hist = torch.tensor([[-1, 5, 9, 2], [1, 2, 3, 4]])
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(model.score(hist), plain.score(hist), atol=1e-5)
        # the projection really changed the rows (the test is not vacuous)
        assert not torch.allclose(model.output_weight(), type(model)._base_output_weight(model))


def test_embedding_distillation_trains_and_checkpoints_plain(small_split, shards, embeddings, tmp_path):
    cfg = distill_cfg(tmp_path, shards, distill={"teacher_embeddings": [embeddings], "embedding": {"enabled": True}})
    rand = random_init_ndcg(cfg, small_split)
    res = train_distilled(cfg, small_split)
    assert res.valid["NDCG@10"] > 3 * rand + 0.004
    model, _, _ = load_checkpoint(res.checkpoint_dir, small_split)
    assert type(model).__name__ == "SASRec"
    again = evaluate(model, small_split, "valid", max_len=20, progress=False)
    assert again["NDCG@10"] == pytest.approx(res.valid["NDCG@10"], abs=1e-9)
