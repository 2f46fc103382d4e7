"""The exported artifact reproduces the in-memory student, loads without the training code, and
refuses bad artifacts and bad histories with errors naming the problem."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from prmkd_dist.data.dataset import left_pad
from prmkd_dist.serve.artifact import ArtifactError, HistoryError, ServingArtifact
from prmkd_dist.serve.export import ExportCheckError, ExportError, export_student

from .conftest import STUDENTS, TRAIN_LEN

K = 10
NUM_USERS = 300


def eval_histories(split, n=NUM_USERS):
    """Full test-stage histories (longer than the model reads) of ``n`` users, plus an empty one."""
    users = split.eval_users("test")[:n]
    return [split.history(int(u), "test") for u in users] + [np.empty(0, np.int64)]


def model_topk(model, seqs, k=K):
    """Reference: the training model's ``score`` on the training-length padding, with every item of the
    full history excluded."""
    with torch.no_grad():
        scores = model.score(torch.from_numpy(left_pad(seqs, TRAIN_LEN if model.registry_name != "caser" else 50)))
    for i, s in enumerate(seqs):
        scores[i, torch.from_numpy(s)] = -torch.inf
    return torch.topk(scores, k, dim=1)


FRESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from prmkd_dist.serve.artifact import ServingArtifact
    args = json.load(open(sys.argv[1]))
    out = {}
    for name, directory in args["artifacts"].items():
        art = ServingArtifact.load(directory)
        ids, scores = art.recommend([np.asarray(h, dtype=np.int64) for h in args["histories"]], k=args["k"])
        out[name] = {"ids": ids.tolist(), "scores": scores.tolist()}
    training = ("prmkd_dist.models", "prmkd_dist.train", "prmkd_dist.data", "prmkd_dist.teachers", "torchrec")
    out["imported"] = sorted(m for m in sys.modules if m.startswith(training))
    json.dump(out, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="module")
def fresh_results(artifacts, ml_small_split, tmp_path_factory):
    """Recommendations of every artifact computed in a fresh interpreter that imports only the loader."""
    d = tmp_path_factory.mktemp("fresh")
    seqs = eval_histories(ml_small_split)
    (d / "args.json").write_text(json.dumps({"artifacts": {k: str(v) for k, v in artifacts.items()},
                                             "histories": [s.tolist() for s in seqs], "k": K}))
    (d / "run.py").write_text(FRESH_SCRIPT)
    proc = subprocess.run([sys.executable, str(d / "run.py"), str(d / "args.json"), str(d / "out.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((d / "out.json").read_text()), seqs


def test_fresh_loader_imports_no_training_code(fresh_results):
    results, _ = fresh_results
    assert results["imported"] == []


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_fresh_artifact_matches_in_memory_model(name, fresh_results, trained_students):
    results, seqs = fresh_results
    ref_scores, ref_ids = model_topk(trained_students[name], seqs)
    got_ids = torch.tensor(results[name]["ids"])
    got_scores = torch.tensor(results[name]["scores"])
    assert got_ids.shape == (len(seqs), K)
    assert torch.equal(got_ids, ref_ids)
    assert torch.allclose(got_scores, ref_scores, atol=1e-5, rtol=0)
    # the reference really excludes the history: no recommended item was seen
    for row, s in zip(got_ids.tolist(), seqs):
        assert not set(row) & set(s.tolist())


def test_manifest_and_files(artifacts, trained_students):
    m = json.loads((artifacts["caser"] / "manifest.json").read_text())
    assert m["format"] == "prmkd-dist/serving-artifact" and m["version"] == 1
    assert m["history_len"] == 5 and not m["tied_output"] and m["has_bias"]
    assert set(m["files"]) == {"encoder.pt2", "weights.safetensors", "items.json", "config.json"}
    assert m["num_parameters"] == sum(p.numel() for p in trained_students["caser"].parameters())
    sasrec = json.loads((artifacts["sasrec"] / "manifest.json").read_text())
    assert sasrec["tied_output"] and not sasrec["has_bias"] and sasrec["history_len"] == TRAIN_LEN
    # the item table is stored once: the program holds only the encoder's own weights
    assert sasrec["files"]["encoder.pt2"]["bytes"] < sasrec["files"]["weights.safetensors"]["bytes"] / 2


def test_raw_ids_in_and_out(artifacts, ml_small, ml_small_split):
    art = ServingArtifact.load(artifacts["gru4rec"])
    seqs = eval_histories(ml_small_split, 20)[:-1]  # the empty history scores all items alike: ties
    ids, scores = art.recommend(seqs, k=K)
    raw_hist = [[ml_small.item_raw_ids[i] for i in s] for s in seqs]
    raw_ids, raw_scores = art.recommend(raw_hist, k=K, raw_ids=True)
    assert raw_ids.tolist() == [[str(ml_small.item_raw_ids[i]) for i in row] for row in ids.tolist()]
    assert torch.equal(raw_scores, scores)
    # a left-padded [B, L] tensor of internal ids is the same input as the list form
    padded = torch.from_numpy(left_pad(seqs, max(len(x) for x in seqs)))
    assert torch.equal(art.recommend(padded, k=K)[0], ids)


def test_exclude_seen_off_and_short_catalog(artifacts, ml_small):
    art = ServingArtifact.load(artifacts["sasrec"])
    hist = [np.arange(ml_small.num_items - 3)]  # all but 3 items seen
    ids, scores = art.recommend(hist, k=5)
    assert sorted(ids[0, :3].tolist()) == [ml_small.num_items - 3, ml_small.num_items - 2, ml_small.num_items - 1]
    assert ids[0, 3:].tolist() == [-1, -1] and torch.isinf(scores[0, 3:]).all()
    ids_all, _ = art.recommend(hist, k=5, exclude_seen=False)
    assert (ids_all >= 0).all() and len(set(ids_all[0].tolist())) == 5


@pytest.mark.parametrize("name", ["sasrec", "caser"])
def test_approximate_search(name, artifacts, ml_small_split):
    art = ServingArtifact.load(artifacts[name])
    seqs = eval_histories(ml_small_split, 200)[:-1]  # the empty history scores all items alike: ties
    exact, _ = art.recommend(seqs, k=K)
    recalls = {}
    for nprobe in (art.num_lists // 8, art.num_lists // 2):
        approx, approx_scores = art.recommend(seqs, k=K, approximate=True, nprobe=nprobe)
        for row, s in zip(approx.tolist(), seqs):
            assert all(0 <= i < art.num_items for i in row) and len(set(row)) == K
            assert not set(row) & set(s.tolist())
        assert (approx_scores[:, :-1] >= approx_scores[:, 1:]).all()  # sorted, best first
        recalls[nprobe] = np.mean([len(set(a) & set(e)) / K for a, e in zip(approx.tolist(), exact.tolist())])
    # more clusters probed -> more of the exact top-K found; half of them already finds most of it
    assert recalls[art.num_lists // 8] <= recalls[art.num_lists // 2]
    assert recalls[art.num_lists // 2] >= 0.9, recalls
    # probing every cluster is exact search
    full, _ = art.recommend(seqs, k=K, approximate=True, nprobe=art.num_lists)
    assert torch.equal(full, exact)


def test_bad_histories(artifacts):
    art = ServingArtifact.load(artifacts["sasrec"])
    with pytest.raises(HistoryError, match=r"row 1: item id 999999"):
        art.recommend([[1, 2], [999999]], k=5)
    with pytest.raises(HistoryError, match=r"row 0: raw item id 'no-such-movie'"):
        art.recommend([["1", "no-such-movie"]], k=5, raw_ids=True)
    with pytest.raises(ValueError, match="k must be"):
        art.recommend([[1]], k=0)
    with pytest.raises(ValueError, match="nprobe"):
        art.recommend([[1]], k=5, approximate=True, nprobe=art.num_lists + 1)


def test_bad_artifacts(artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        ServingArtifact.load(tmp_path / "nothing")
    d = tmp_path / "copy"
    shutil.copytree(artifacts["gru4rec"], d)
    (d / "items.json").unlink()
    with pytest.raises(ArtifactError, match=r"items\.json: missing"):
        ServingArtifact.load(d)
    shutil.rmtree(d)
    shutil.copytree(artifacts["gru4rec"], d)
    data = bytearray((d / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte
    (d / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: sha256 does not match"):
        ServingArtifact.load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json: not valid JSON"):
        ServingArtifact.load(d)
    (d / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="format 'something-else'"):
        ServingArtifact.load(d)


def test_export_check_fails_loudly(trained_students, ml_small, tmp_path):
    model = trained_students["gru4rec"]
    original = model.user_embedding
    # a training model the dense encoder does not reproduce (as a broken dense equivalent would)
    model.user_embedding = lambda h: original(h) + 1e-2
    try:
        with pytest.raises(ExportCheckError, match="differs from the training model"):
            export_student(model, ml_small, tmp_path / "a")
    finally:
        del model.user_embedding
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor a staging directory was written


def test_export_refuses_other_catalog(ml_small, tmp_path):
    from prmkd_dist.models import build_student

    with pytest.raises(ExportError, match="items"):
        export_student(build_student("sasrec", ml_small.num_items + 1, dim=16, max_len=10), ml_small, tmp_path / "a")
