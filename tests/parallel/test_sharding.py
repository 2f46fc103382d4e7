"""Planning and sharding the students' TorchRec tables: constraints, plan description, and (2 real gloo
processes) the shards each rank actually holds for row-, table- and column-wise sharding."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from prmkd_dist.models import build_student
from prmkd_dist.parallel import sharding as sh

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: the helper is not importable
from _launch import reports, torchrun  # noqa: E402


def caser(num_items: int = 103):
    torch.manual_seed(0)
    return build_student("caser", num_items, dim=16, max_len=4, num_h_filters=2, num_v_filters=1)


@pytest.mark.parametrize("kind", ["row_wise", "table_wise", "column_wise"])
def test_plan_for_two_ranks_tiles_every_table(kind):
    plan = sh.plan_sharding(caser(), world_size=2, sharding=kind)  # no process group: planned locally
    shards = sh.plan_shards(plan)
    assert {s.table for s in shards} == {"item", "item_out"}
    for table in ("item", "item_out"):
        mine = [s for s in shards if s.table == table]
        assert {s.sharding_type for s in mine} == {kind}
        cells = sum((s.row_hi - s.row_lo) * (s.col_hi - s.col_lo) for s in mine)
        assert cells == 103 * 16  # the shards tile the table exactly
        if kind == "row_wise":
            assert [(s.rank, s.row_lo, s.row_hi) for s in mine] == [(0, 0, 52), (1, 52, 103)]
        elif kind == "column_wise":
            assert sorted((s.col_lo, s.col_hi) for s in mine) == [(0, 8), (8, 16)]
            assert {s.rank for s in mine} == {0, 1}
        else:
            assert len(mine) == 1 and (mine[0].row_lo, mine[0].row_hi) == (0, 103)
    text = sh.describe_plan(plan)
    assert text.splitlines()[0].startswith("table | module | sharding")
    assert f"item_out | out_ec | {kind} | fused |" in text


def test_constraints_and_optimizer_errors():
    model = caser()
    cons = sh.sharding_constraints(model, "auto", {"item_out": "row_wise"})
    assert cons["item_out"].sharding_types == ["row_wise"]
    assert set(cons["item"].sharding_types) == {"row_wise", "table_wise", "column_wise"}  # never data_parallel
    with pytest.raises(sh.ShardingConfigError, match="unknown tables"):
        sh.sharding_constraints(model, "auto", {"nope": "row_wise"})
    with pytest.raises(sh.ShardingConfigError, match="expected one of"):
        sh.sharding_constraints(model, "diagonal")
    with pytest.raises(sh.ShardingConfigError, match="no fused CPU kernel"):
        sh.attach_table_optimizer(model, "adam", "cpu", lr=0.1)


@pytest.mark.multiproc
def test_two_ranks_hold_the_planned_shards(tmp_path):
    torchrun(["placement", str(tmp_path)])
    r0, r1 = reports(tmp_path, "placement")
    for kind in ("row_wise", "table_wise", "column_wise"):
        held = {(r, s["table"], tuple(s["rows"]), tuple(s["cols"])) for r, rep in enumerate((r0, r1))
                for s in rep[kind]["shards"]}
        planned = {(p["rank"], p["table"], (p["row_lo"], p["row_hi"]), (p["col_lo"], p["col_hi"]))
                   for p in r0[kind]["plan"]}
        assert held == planned, kind
        # weights were copied from the unsharded tables into the right blocks
        assert all(s["equal"] for rep in (r0, r1) for s in rep[kind]["shards"])
        assert not any(n.startswith(("item_ec", "out_ec")) for n in r0[kind]["dense"])  # tables are not dense
        assert "fc.weight" in r0[kind]["dense"] and "out_bias" in r0[kind]["dense"]
    assert {s["table"] for s in r0["row_wise"]["shards"]} == {"item", "item_out"}
    assert [s["rows"] for s in r1["row_wise"]["shards"]] == [[52, 103], [52, 103]]
