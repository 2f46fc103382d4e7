"""The public API around the loss: every validation error, the check_inputs flag, dtype normalisation, the one
backend dispatcher (auto / explicit / unavailable, with reasons) and the cheap package import."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prmkd_dist
from prmkd_dist import available_backends, kd_loss, kd_loss_linear
from prmkd_dist.distill import last_resolution, resolve_backend

B, C, T, K, D = 3, 6, 2, 3, 4


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        logits=torch.randn(B, C, generator=g),
        target=torch.tensor([0, 5, -1]),
        teacher_ids=torch.tensor([[[1, 2, -1], [5, -1, -1]], [[0, 0, 3], [-1, -1, -1]], [[4, 1, 2], [2, 3, 4]]]),
        teacher_scores=torch.randn(B, T, K, generator=g),
        teacher_weights=torch.rand(B, T, generator=g),
        rank_weights=torch.rand(B, T, K, generator=g),
    )


def linear_inputs():
    d = inputs()
    g = torch.Generator().manual_seed(1)
    del d["logits"]
    return dict(user_emb=torch.randn(B, D, generator=g), item_emb=torch.randn(C, D, generator=g),
                item_bias=torch.randn(C, generator=g), **d)


def call(d, **kw):
    d = dict(d)
    rank = d.pop("rank_weights")
    return kd_loss(*d.values(), rank, lambda_rank=0.5, **kw)


def call_linear(d, **kw):
    d = dict(d)
    bias = d.pop("item_bias")
    rank = d.pop("rank_weights")
    return kd_loss_linear(*d.values(), rank, item_bias=bias, lambda_rank=0.5, **kw)


def _set(d, name, index, value):
    d[name] = d[name].clone()
    d[name][index] = value
    return d


# (mutation, message that must appear) -- data errors, found by the scans of check_inputs
DATA_ERRORS = [
    (lambda d: _set(d, "teacher_ids", (1, 0, 2), C), r"teacher_ids\[1, 0, 2\] = 6: ids must be in \[-1, 6\)"),
    (lambda d: _set(d, "teacher_ids", (2, 1, 0), -2), r"teacher_ids\[2, 1, 0\] = -2"),
    (lambda d: _set(d, "target", (1,), C), r"target\[1\] = 6"),
    (lambda d: _set(d, "target", (0,), -3), r"target\[0\] = -3"),
    (lambda d: _set(d, "teacher_scores", (0, 1, 1), float("nan")), r"teacher_scores\[0, 1, 1\] = nan.*finite"),
    (lambda d: _set(d, "teacher_weights", (2, 0), float("inf")), r"teacher_weights\[2, 0\] = inf"),
    (lambda d: _set(d, "teacher_weights", (1, 1), -0.5), r"teacher_weights\[1, 1\] = -0.5.*>= 0"),
    (lambda d: _set(d, "rank_weights", (0, 0, 2), float("-inf")), r"rank_weights\[0, 0, 2\] = -inf"),
    (lambda d: _set(d, "rank_weights", (2, 1, 1), -1.0), r"rank_weights\[2, 1, 1\] = -1.0"),
]


@pytest.mark.parametrize("mutate,message", DATA_ERRORS)
def test_data_errors_name_argument_and_position(mutate, message):
    with pytest.raises(ValueError, match=message):
        call(mutate(inputs()))
    with pytest.raises(ValueError, match=message):
        call_linear(mutate(linear_inputs()))


def test_nan_in_student_tensors():
    with pytest.raises(ValueError, match=r"logits\[1, 4\] = nan"):
        call(_set(inputs(), "logits", (1, 4), float("nan")))
    for name, index in (("user_emb", (2, 3)), ("item_emb", (5, 0)), ("item_bias", (3,))):
        with pytest.raises(ValueError, match=rf"{name}\[{', '.join(map(str, index))}\] = inf"):
            call_linear(_set(linear_inputs(), name, index, float("inf")))


def test_check_inputs_false_skips_the_scans_but_not_shape_checks():
    bad = _set(inputs(), "teacher_weights", (1, 1), -0.5)
    assert torch.isfinite(call(bad, check_inputs=False))  # the caller vouched for its data
    d = inputs()
    d["teacher_weights"] = d["teacher_weights"][:, :1]
    with pytest.raises(ValueError, match=r"teacher_weights must be \[B, T\] = \[3, 2\]"):
        call(d, check_inputs=False)


SHAPE_ERRORS = [
    (lambda d: d.update(logits=d["logits"][0]), r"logits must be a \[B, C\] tensor"),
    (lambda d: d.update(logits=d["logits"].half()), r"logits must be float32, bfloat16 or float64"),
    (lambda d: d.update(target=d["target"][:2]), r"target must be \[B\] = \[3\]"),
    (lambda d: d.update(target=d["target"].float()), r"target must be int64"),
    (lambda d: d.update(teacher_ids=d["teacher_ids"][:, :, 0]), r"teacher_ids must be \[B, T, K\]"),
    (lambda d: d.update(teacher_ids=d["teacher_ids"].float()), r"teacher_ids must be int64"),
    (lambda d: d.update(teacher_ids=d["teacher_ids"][:2]), r"teacher_ids has batch size 2, expected 3"),
    (lambda d: d.update(teacher_scores=d["teacher_scores"][:, :, :2]), r"teacher_scores must have the shape"),
    (lambda d: d.update(teacher_scores=d["teacher_scores"].long()), r"teacher_scores must be a float tensor"),
    (lambda d: d.update(rank_weights=d["rank_weights"][:, :1]), r"rank_weights must have the shape"),
    (lambda d: d.update(logits=d["logits"][:0], target=d["target"][:0], teacher_ids=d["teacher_ids"][:0],
                        teacher_scores=d["teacher_scores"][:0], teacher_weights=d["teacher_weights"][:0],
                        rank_weights=d["rank_weights"][:0]), r"the batch is empty"),
]


@pytest.mark.parametrize("mutate,message", SHAPE_ERRORS)
def test_shape_and_dtype_errors(mutate, message):
    d = inputs()
    mutate(d)
    with pytest.raises(ValueError, match=message):
        call(d)


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=0.0), r"temperature must be > 0"),
    (dict(temperature=-1.0), r"temperature must be > 0"),
    (dict(temperature=float("nan")), r"temperature must be a finite number"),
    (dict(lambda_kd=float("inf")), r"lambda_kd must be a finite number"),
    (dict(reduction="avg"), r"reduction must be one of"),
    (dict(backend="cuda"), r"backend must be one of"),
])
def test_hyperparameter_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        call(inputs(), **kw)


def test_linear_shape_errors():
    d = linear_inputs()
    d["item_emb"] = d["item_emb"][:, :3]
    with pytest.raises(ValueError, match=r"must share d"):
        call_linear(d)
    d = linear_inputs()
    d["item_bias"] = d["item_bias"][:4]
    with pytest.raises(ValueError, match=r"item_bias must be \[C\] = \[6\]"):
        call_linear(d)
    d = linear_inputs()
    d["item_emb"] = d["item_emb"].double()
    with pytest.raises(ValueError, match=r"must share one dtype"):
        call_linear(d)
    d = linear_inputs()
    d["item_bias"] = d["item_bias"].double()
    with pytest.raises(ValueError, match=r"item_bias \(torch.float64\) must have the dtype of item_emb"):
        call_linear(d)
    d = _set(linear_inputs(), "teacher_ids", (0, 0, 0), C)  # C comes from item_emb's rows
    with pytest.raises(ValueError, match=r"teacher_ids\[0, 0, 0\] = 6"):
        call_linear(d)


def test_dtype_normalisation_int32_ids_and_float64_teacher_tensors():
    d = inputs()
    want = call(d, backend="reference")
    d32 = dict(d, target=d["target"].int(), teacher_ids=d["teacher_ids"].int(),
               teacher_scores=d["teacher_scores"].double(), teacher_weights=d["teacher_weights"].double())
    got = call(d32, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------- dispatcher
def test_resolve_backend_auto_on_cpu_says_why():
    avail = available_backends("cpu")
    assert avail["reference"] == (True, "")
    assert avail["triton"][0] is False and avail["triton"][1].startswith("triton: needs CUDA tensors")
    name, module, reason = resolve_backend("auto", "cpu")
    if avail["cpp"][0]:
        assert name == "cpp" and "auto -> cpp" in reason
    else:
        assert name == "reference" and avail["cpp"][1] in reason and "triton" in reason
    assert callable(module.kd_loss_rows) and callable(module.kd_loss_linear_rows)


def test_auto_float64_goes_to_reference():
    name, _, reason = resolve_backend("auto", "cpu", torch.float64)
    assert name == "reference" and "float64" in reason


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    # without the interpreter, Triton cannot serve CPU tensors even when asked for by name
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested but is unavailable: triton: "):
        call(inputs(), backend="triton")
    with pytest.raises(RuntimeError, match=r"float64 inputs are computed by the reference only"):
        resolve_backend("cpp", "cpu", torch.float64)


def test_auto_call_records_its_resolution_and_matches_reference():
    d = inputs()
    auto = call(d, temperature=2.0, reduction="none")
    assert last_resolution().name == resolve_backend("auto", "cpu").name
    torch.testing.assert_close(auto, call(d, temperature=2.0, reduction="none", backend="reference"),
                               rtol=1e-5, atol=1e-6)
    assert last_resolution().name == "reference" and "explicitly" in last_resolution().reason


def test_package_import_is_cheap_and_exports_the_api():
    code = ("import sys, prmkd_dist; assert 'torch' not in sys.modules; import prmkd_dist.distill as d; "
            "assert 'triton' not in sys.modules and 'prmkd_dist._C' not in sys.modules, 'eager backend import'; "
            "assert prmkd_dist.kd_loss is d.kd_loss and prmkd_dist.importance_weights is d.importance_weights")
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("kd_loss", "kd_loss_linear", "teacher_weights", "importance_weights", "available_backends"):
        assert name in prmkd_dist.__all__ and callable(getattr(prmkd_dist, name))
