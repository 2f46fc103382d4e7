import pytest
import torch

from prmkd_dist.distill.embedding import ItemTableExtension, extend_items, is_tied
from prmkd_dist.distill.mkd import ConsistentPreference, _merge_repeats, blended_soft_label, teacher_neighbours
from prmkd_dist.distill.trainer import train_distilled
from prmkd_dist.models import build_student

from .test_distill_trainer import distill_cfg, random_init_ndcg, embeddings, shards, small_split  # noqa: F401  (fixtures)


def test_teacher_neighbours_by_cosine_in_chunks():
    torch.manual_seed(0)
    emb = torch.randn(30, 4)
    emb[7] = 0.0  # an item without teacher embedding
    ids, w = teacher_neighbours(emb, 5, chunk_rows=7)
    unit = torch.nn.functional.normalize(emb, dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-float("inf"))
    assert torch.equal(ids[3], sim[3].topk(5).indices)
    assert (ids != torch.arange(30)[:, None]).all()
    pos = sim[3].topk(5).values.clamp(min=0)
    assert torch.allclose(w[3], pos / pos.sum())
    assert (w[7] == 0).all()  # no embedding -> no augmentation
    assert torch.allclose(w.sum(1)[w.sum(1) > 0], torch.ones(1))


def test_nkd_rows_add_the_weighted_neighbour_rows():
    torch.manual_seed(0)
    student = build_student("sasrec", 12, dim=8, max_len=4, dropout=0.0)
    own = student.item_table_weight().detach().clone()
    nbr = torch.stack([torch.tensor([(i + 1) % 12, (i + 2) % 12]) for i in range(12)])
    w = torch.tensor([[0.75, 0.25]]).repeat(12, 1)
    extend_items(student, ItemTableExtension(8, is_tied(student), None, neighbours=nbr, neighbour_weights=w, beta=0.5))
    rows = student.embed_items(torch.tensor([[-1, 3, 11]]))[0]
    assert torch.equal(rows[0], torch.zeros(8))
    assert torch.allclose(rows[1], own[3] + 0.5 * (0.75 * own[4] + 0.25 * own[5]), atol=1e-6)
    assert torch.allclose(rows[2], own[11] + 0.5 * (0.75 * own[0] + 0.25 * own[1]), atol=1e-6)
    assert torch.allclose(student.output_weight()[3], rows[1], atol=1e-6)  # tied: the same rows score


def test_cpd_preference_and_gradient():
    torch.manual_seed(0)
    temb = torch.randn(10, 6)
    ids = torch.tensor([[[1, 2], [2, -1]], [[-1, -1], [-1, -1]]])
    scores = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    w = torch.tensor([[0.4, 0.6], [0.0, 0.0]])
    pref, has = ConsistentPreference.preference(temb, ids, scores, w)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    assert torch.allclose(pref[0], 0.4 * (p[0] * temb[1] + p[1] * temb[2]) + 0.6 * temb[2], atol=1e-6)
    assert has.tolist() == [True, False]
    cpd = ConsistentPreference(8, 6)
    user = torch.randn(2, 8, requires_grad=True)
    loss = cpd.loss(user, temb, ids, scores, w)
    loss.backward()
    assert 0 < loss.item() < 2 and user.grad[0].abs().sum() > 0 and user.grad[1].abs().sum() == 0


def test_blended_soft_label_merges_teachers_and_student():
    ids = torch.tensor([[[4, 2], [2, 7]]])
    scores = torch.tensor([[[1.0, 0.0], [2.0, 1.0]]])
    w = torch.tensor([[0.5, 0.5]])
    s_logits = torch.tensor([[[0.3, -0.2], [-0.2, 1.0]]])  # the student's logits at those ids
    tau = 2.0
    out_ids, out_scores = blended_soft_label(s_logits, ids, scores, w, beta=0.7, temperature=tau)
    assert out_ids.tolist() == [[[4, 2, -1, 7]]]  # item 2 kept once
    q = torch.softmax(out_scores[0, 0, [0, 1, 3]] / tau, 0)  # what kd_loss reads back
    p1, p2 = torch.softmax(scores[0, 0] / tau, 0), torch.softmax(scores[0, 1] / tau, 0)
    teacher = torch.tensor([0.5 * p1[0], 0.5 * p1[1] + 0.5 * p2[0], 0.5 * p2[1]])
    student = torch.softmax(torch.tensor([0.3, -0.2, 1.0]) / tau, 0)
    assert torch.allclose(q, 0.7 * teacher + 0.3 * student, atol=1e-6)


def _merge_repeats_pairwise(ids, mass):
    """The direct form: compare every pair of slots ([B, S, S])."""
    valid = ids >= 0
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril(diagonal=-1)
    first = valid & ~(same & earlier).any(dim=-1)
    return first, (same.double() @ mass.unsqueeze(-1)).squeeze(-1) * first


def test_merge_repeats_matches_the_pairwise_form():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 12, (64, 30), generator=g)  # many repeats and empty slots
    ids[0] = -1  # a row with nothing
    ids[1] = 5  # one id everywhere
    mass = torch.rand(64, 30, generator=g, dtype=torch.float64) * (ids >= 0)
    first, merged = _merge_repeats(ids, mass)
    ref_first, ref_merged = _merge_repeats_pairwise(ids, mass)
    assert torch.equal(first, ref_first)
    assert torch.allclose(merged, ref_merged, rtol=1e-12, atol=1e-15)
    assert first[1].tolist() == [True] + [False] * 29 and not first[0].any()


def test_nkd_output_table_and_cpd_preference_match_the_gather_forms():
    """The weighted-bag forms equal the [C, n, d] / [B, T, K, D] gathers they replace, gradients included."""
    torch.manual_seed(0)
    c, n = 40, 6
    student = build_student("caser", c, dim=8, max_len=3, dropout=0.0)  # untied: its own output table
    nbr, w = teacher_neighbours(torch.randn(c, 5), n)
    extend_items(student, ItemTableExtension(8, is_tied(student), None, neighbours=nbr, neighbour_weights=w,
                                             beta=0.5))
    base = type(student)._base_output_weight(student)  # the student's own table, under the extension
    out = student.output_weight()
    ref = base + 0.5 * (w.unsqueeze(-1) * base[nbr]).sum(dim=1)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(out)
    params = [p for p in student.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))
    temb = torch.randn(c, 7, dtype=torch.float64)
    ids = torch.randint(-1, c, (16, 3, 5))
    scores = torch.randn(16, 3, 5, dtype=torch.float64)
    tw = torch.rand(16, 3, dtype=torch.float64)
    pref, _ = ConsistentPreference.preference(temb, ids, scores, tw, temperature=0.5)
    p = torch.softmax((scores / 0.5).masked_fill(ids < 0, -torch.inf), -1).nan_to_num(0.0) * (ids >= 0)
    ref_pref = ((p * tw.unsqueeze(-1)).unsqueeze(-1).double() * temb[ids.clamp(min=0)]).sum(dim=(1, 2))
    assert torch.allclose(pref.double(), ref_pref, rtol=1e-6, atol=1e-6)


def test_local_engine_builds_the_extended_output_table_once_per_step():
    from prmkd_dist.train.engine import LocalEngine

    torch.manual_seed(0)
    student = build_student("sasrec", 20, dim=8, max_len=4, dropout=0.0)
    nbr, w = teacher_neighbours(torch.randn(20, 5), 3)
    extend_items(student, ItemTableExtension(8, is_tied(student), None, neighbours=nbr, neighbour_weights=w, beta=0.5))
    calls = []
    inner = type(student).output_weight
    type(student).output_weight = lambda self: calls.append(1) or inner(self)
    try:
        engine = LocalEngine(student, lr=1e-2)
        engine.train()
        user = torch.randn(4, 8)
        target = torch.tensor([1, 2, 3, 4])
        empty = (torch.empty(4, 0, 0, dtype=torch.long), torch.empty(4, 0, 0), torch.empty(4, 0))
        loss = engine.linear_loss(user, target, *empty) + engine.linear_loss(user, target, *empty)
        assert len(calls) == 1  # two losses of one step: one table
        before = student.item_table_weight().detach().clone()
        engine.step(loss)
        assert not torch.equal(before, student.item_table_weight())
        engine.linear_loss(user, target, *empty)
        assert len(calls) == 2  # a new step: the updated table
        engine.eval()
        engine.output_rows(); engine.output_rows()
        assert len(calls) == 4  # evaluation: no reuse
    finally:
        type(student).output_weight = inner


@pytest.mark.parametrize("lambda_rank", [0.0, 0.7])
def test_soft_label_as_one_more_teacher_equals_its_own_loss(lambda_rank):
    """SLD folded into the KD term (one catalog pass) = the KD loss + a separate SLD loss, value and gradients."""
    from prmkd_dist.distill.loss import kd_loss_linear
    from prmkd_dist.distill.trainer import with_pseudo_teacher

    g = torch.Generator().manual_seed(3)
    n, c, d, t, k, tau, lam_kd, sld = 6, 30, 5, 2, 4, 1.7, 0.6, 0.45
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(c, d, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, c, (n,), generator=g)
    target[0] = -1
    ids = torch.stack([torch.randperm(c, generator=g)[:t * k] for _ in range(n)]).view(n, t, k)
    ids[1, 0, 2:] = -1
    scores = torch.randn(n, t, k, generator=g, dtype=torch.float64)
    w = torch.rand(n, t, generator=g, dtype=torch.float64)
    rho = torch.rand(n, t, k, generator=g, dtype=torch.float64) if lambda_rank else None
    with torch.no_grad():
        s_logits = torch.einsum("nd,nsd->ns", h, table[ids.clamp(min=0).view(n, -1)]).view(n, t, k)
    sl_ids, sl_scores = blended_soft_label(s_logits, ids, scores, w, beta=0.6, temperature=tau)
    kw = dict(temperature=tau, lambda_ce=1.0, lambda_rank=lambda_rank)
    folded = kd_loss_linear(h, table, target, *with_pseudo_teacher(ids, scores, w, rho, sl_ids,
                                                                   sl_scores.double(), sld / lam_kd),
                            lambda_kd=lam_kd, backend="reference", **kw)
    apart = kd_loss_linear(h, table, target, ids, scores, w, rho, lambda_kd=lam_kd, backend="reference", **kw) + \
        sld * kd_loss_linear(h, table, torch.full_like(target, -1), sl_ids, sl_scores.double(),
                             torch.ones(n, 1, dtype=torch.float64), None, temperature=tau, lambda_ce=0.0,
                             lambda_kd=1.0, lambda_rank=0.0, backend="reference")
    assert torch.allclose(folded, apart, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(folded, (h, table))
    g2 = torch.autograd.grad(apart, (h, table))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(g1, g2))


def test_mkd_trains_with_all_three_parts(small_split, shards, embeddings, tmp_path):
    cfg = distill_cfg(tmp_path, shards, distill={
        "teacher_embeddings": [embeddings],
        "mkd": {"nkd": True, "nkd_neighbours": 5, "cpd": 0.5, "sld": 0.5}})
    cfg.optim.epochs = 1
    res = train_distilled(cfg, small_split)
    h = res.history
    assert h[0]["loss_cpd"] > 0 and "loss_sld" not in h[0]  # SLD rides in the KD term (lambda_kd > 0)
    assert type(res).__name__ == "TrainResult" and res.epochs_run == 1
    assert res.valid["NDCG@10"] > 3 * random_init_ndcg(cfg, small_split) + 0.004
