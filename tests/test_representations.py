"""Representations: one contract check per registered representation, and a numpy oracle for each."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from pipeline import representations as reps
from pipeline.errors import PipelineError
from pipeline.representations import REGISTRY, describe_all, from_spec, get, register, resolve
from reference import REFERENCES, ref_dw_stats

TENSOR = [name for name, rep in REGISTRY.items() if rep.kind == "tensor"]
MODULE = [name for name, rep in REGISTRY.items() if rep.kind == "module"]

# Shapes of stored LoRA tensors: down (r, in), up (out, r), plus a generic matrix with >= 10 singular
# values and a tiny one (fewer than 10 entries: padding paths).
TENSOR_SHAPES = [(1, 16), (4, 24), (40, 4), (24, 1), (12, 16), (2, 3)]
MODULE_SHAPES = [(1, 16, 24), (4, 24, 40), (4, 40, 16)]  # (r, in, out)
SCALES = [1.0, 1e-3]


# --- seeded data ------------------------------------------------------------------------------------


def tensor_batch(n, rows, cols, scale=1.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, rows, cols, generator=g)


def module_batch(n, r, fan_in, fan_out, b_scale=1e-3, seed=0, negative=False):
    """A ~ N(0, 1), B ~ b_scale N(0, 1), scale in [0.5, 2] (one negative when asked): LoRA-like."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, fan_in, generator=g)
    B = b_scale * torch.randn(n, fan_out, r, generator=g)
    scale = 0.5 + 1.5 * torch.rand(n, generator=g)
    if negative:
        scale[0] = -scale[0]
    return A, B, scale


def inputs_for(rep, n=7, seed=0):
    if rep.kind == "tensor":
        return (tensor_batch(n, 4, 24, seed=seed),)
    return module_batch(n, 4, 24, 40, seed=seed)


def degenerate_inputs(rep):
    """Zeros, constants, rank one, a single entry: none may give NaN or Inf."""
    if rep.kind == "tensor":
        a = torch.randn(24, generator=torch.Generator().manual_seed(1))
        b = torch.randn(16, generator=torch.Generator().manual_seed(2))
        return [
            (torch.zeros(3, 4, 24),), (torch.zeros(3, 40, 1),), (torch.full((3, 16, 4), 0.3),),
            (torch.full((3, 1, 16), -2.0),), (torch.outer(b, a).expand(3, 16, 24).clone(),),
            (torch.zeros(2, 1, 1),), (torch.full((2, 1, 1), 5.0),), (1e6 * torch.randn(3, 4, 24),),
        ]
    A, B, s = module_batch(3, 4, 24, 40)
    a = torch.randn(1, 1, 24).expand(3, 4, 24).clone()  # equal rows: B A has rank 1 at r = 4
    ones = torch.ones(3)
    return [
        (A, torch.zeros_like(B), s),  # untrained peft adapter
        (torch.zeros_like(A), B, s),
        (A, B, torch.zeros(3)),
        (torch.full((3, 4, 24), 0.7), torch.full((3, 40, 4), 1e-3), ones),  # constant dW
        (a, B, s),
        (A[:, :1], B[:, :, :1], s),  # rank 1
        (torch.zeros(2, 1, 1), torch.zeros(2, 1, 1), torch.ones(2)),
        (torch.ones(2, 1, 1), torch.ones(2, 1, 1), torch.ones(2)),
    ]


# --- the contract, for every registered representation ---------------------------------------------


@pytest.mark.parametrize("name", list(REGISTRY))
def test_contract(name):
    """Width/dtype, determinism, batch-split invariance, input untouched, spec round trip, pickling."""
    rep = REGISTRY[name]
    inputs = inputs_for(rep)
    before = [t.clone() for t in inputs]
    out = rep(*inputs)

    assert out.shape == (7, rep.width) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, rep(*inputs)), "not deterministic"
    assert all(torch.equal(t, b) for t, b in zip(inputs, before)), "input modified"

    head = rep(*[t[:3] for t in inputs])
    tail = rep(*[t[3:] for t in inputs])
    torch.testing.assert_close(torch.cat([head, tail]), out, rtol=1e-5, atol=1e-7)

    spec = json.loads(json.dumps(rep.spec()))  # JSON-serialisable, and survives the trip
    assert set(spec) == {"name", "version", "configuration"}
    again = from_spec(spec)
    assert again == rep and again.spec_hash() == rep.spec_hash()
    assert len(rep.spec_hash()) == 16 and set(rep.spec_hash()) <= set("0123456789abcdef")  # 16 lowercase hex digits

    shipped = pickle.loads(pickle.dumps(rep))
    assert shipped == rep and torch.equal(shipped(*inputs), out)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_degenerate_inputs_are_finite(name):
    rep = REGISTRY[name]
    for inputs in degenerate_inputs(rep):
        out = rep(*inputs)
        assert out.shape == (inputs[0].shape[0], rep.width)
        assert torch.isfinite(out).all(), f"{name}: non-finite on shapes {[tuple(t.shape) for t in inputs]}"


@pytest.mark.parametrize("name", MODULE)
def test_module_degenerate_values(name):
    """dW = 0 (B = 0, the untrained peft init) gives all zeros for every module representation."""
    rep = REGISTRY[name]
    A, B, s = module_batch(3, 4, 24, 40)
    assert torch.equal(rep(A, torch.zeros_like(B), s), torch.zeros(3, rep.width))


@pytest.mark.parametrize("name", MODULE)
@pytest.mark.parametrize("r", [1, 4])
def test_module_gl_invariance(name, r):
    """(B G^-1, G A) with G = orthogonal x diag in [0.5, 2] (condition <= 4): same features, rtol 1e-3.

    The atol is 1e-4 of each feature's largest magnitude over the batch (float32 rounding of G A).
    """
    rep = REGISTRY[name]
    assert rep.invariance.startswith("GL(r)")
    A, B, s = module_batch(6, r, 24, 40, seed=3)
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(6, r, r, generator=g, dtype=torch.float64))
    G = q * (0.5 + 1.5 * torch.rand(6, 1, r, generator=g, dtype=torch.float64))
    A2 = (G @ A.double()).float()
    B2 = (B.double() @ torch.linalg.inv(G)).float()
    base, moved = rep(A, B, s), rep(A2, B2, s)
    assert not torch.allclose(A2, A)
    atol = 1e-4 * base.abs().amax(0, keepdim=True) + 1e-12
    assert ((moved - base).abs() <= atol + 1e-3 * base.abs()).all(), (moved - base).abs().max()


def test_every_representation_has_a_reference():
    assert set(REFERENCES) == set(REGISTRY)


def _assert_matches(got, ref, name):
    """rtol 1e-4, atol max(1e-5 x the feature's largest |value| over the batch, 1e-7).

    We compute in float32 (as the original did), the oracle in float64: e.g. spectral's entropy at
    rank 1 is log(1 + 1e-8) = 0 in float32 but -7.7e-9 in float64, hence the 1e-7 floor (~eps32).
    """
    got, ref = got.double().numpy(), np.asarray(ref, dtype=np.float64)
    atol = np.maximum(1e-5 * np.abs(ref).max(0, keepdims=True), 1e-7)
    bad = np.abs(got - ref) > atol + 1e-4 * np.abs(ref)
    assert not bad.any(), f"{name}: features {np.unique(np.nonzero(bad)[1])} differ:\n{got[bad]}\n{ref[bad]}"


@pytest.mark.parametrize("name", TENSOR)
@pytest.mark.parametrize("shape", TENSOR_SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_tensor_reference(name, shape, scale):
    x = tensor_batch(5, *shape, scale=scale, seed=11)
    got = REGISTRY[name](x)
    ref = [REFERENCES[name](m) for m in x.numpy()]
    _assert_matches(got, ref, name)


@pytest.mark.parametrize("name", MODULE)
@pytest.mark.parametrize("shape", MODULE_SHAPES)
@pytest.mark.parametrize("b_scale", SCALES)
def test_module_reference(name, shape, b_scale):
    """dw_spectrum here is checked against numpy.linalg.svd of the dense product."""
    rep = REGISTRY[name]
    A, B, s = module_batch(5, *shape, b_scale=b_scale, seed=12, negative=True)
    got = rep(A, B, s)
    ref = [REFERENCES[name](a, b, sc, rep.params) for a, b, sc in zip(A.numpy(), B.numpy(), s.numpy())]
    _assert_matches(got, ref, name)


# --- details that change the numbers ---------------------------------------------------------------


def test_quantiles_are_torch_quantile_exactly():
    x = tensor_batch(6, 7, 13, seed=5).flatten(1)
    got = reps._quantiles_sorted(torch.sort(x, 1).values, reps.RANK_QUANTILES)
    assert torch.equal(got, torch.quantile(x, torch.tensor(reps.RANK_QUANTILES), dim=1).T)


def test_median_is_lower_middle_like_torch():
    x = tensor_batch(4, 2, 8, seed=6)  # even count
    assert torch.equal(REGISTRY["stats"](x)[:, 2], x.flatten(1).median(1).values)


def test_histogram_counts_are_numpy_exactly():
    ramp = torch.linspace(0, 1, 240).view(1, 8, 30)  # values on the edges
    x = torch.cat([tensor_batch(4, 8, 30, seed=7), torch.full((1, 8, 30), 2.5), ramp, 1e-30 * tensor_batch(1, 8, 30)])
    got = reps._histogram_counts(x.flatten(1)).numpy()
    ref = np.stack([np.histogram(row, bins=50)[0] for row in x.flatten(1).numpy()])
    np.testing.assert_array_equal(got, ref)
    # degenerate edges (1e30 - 0.5 == 1e30 in float32; numpy refuses): the searchsorted fallback
    huge = torch.cat([x.flatten(1)[:2], torch.full((1, 240), 1e30)])
    got = reps._histogram_counts(huge).numpy()
    np.testing.assert_array_equal(got[:2], ref[:2])
    assert got[2, 49] == 240 and got[2].sum() == 240


def test_spectral_condition_is_huge_but_finite_below_rank_ten():
    x = tensor_batch(3, 1, 16, seed=8)  # rank 1: s_9 is the zero padding
    out = REGISTRY["spectral"](x)
    s0 = torch.linalg.vector_norm(x.flatten(1), dim=1)
    torch.testing.assert_close(out[:, 30], s0 / 1e-8, rtol=1e-5, atol=0)
    assert torch.isfinite(REGISTRY["spectral"](1e32 * x)).all()  # would overflow float32: clamped


def test_ensemble_is_its_parts():
    x = tensor_batch(3, 4, 24, seed=9)
    parts = torch.cat([REGISTRY[name](x) for name in reps.ENSEMBLE_PARTS], 1)
    assert torch.equal(REGISTRY["ensemble"](x), parts)


@pytest.mark.parametrize("factored", [True, False])
def test_dw_stats_chunking_does_not_change_the_numbers(monkeypatch, factored):
    monkeypatch.setattr(reps, "_dw_moments_factored", lambda *shape: factored)
    A, B, s = module_batch(7, 4, 24, 40, seed=10)
    whole = REGISTRY["dw_stats"](A, B, s)
    monkeypatch.setattr(reps, "_MOMENT_CHUNK_ELEMENTS", 1)  # one sample per chunk
    torch.testing.assert_close(REGISTRY["dw_stats"](A, B, s), whole, rtol=1e-6, atol=0)


def test_dw_quantiles_chunking_does_not_change_the_numbers(monkeypatch):
    A, B, s = module_batch(7, 4, 24, 40, seed=10)
    whole = REGISTRY["dw_quantiles"](A, B, s)
    monkeypatch.setattr(reps, "_DW_CHUNK_ELEMENTS", 2 * 24 * 40)  # two samples per chunk
    assert torch.equal(REGISTRY["dw_quantiles"](A, B, s), whole)


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("r", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("shape", [(24, 40), (40, 16), (1, 7)])
def test_dw_stats_both_paths_match_the_dense_reference(monkeypatch, factored, r, shape):
    """Factor moment tensors (no dW) and the chunk-wise dense fallback, against float64 numpy on B @ A.

    Also with a large mean (B shifted): the raw -> central moment conversion must hold in float64.
    """
    monkeypatch.setattr(reps, "_dw_moments_factored", lambda *s: factored)
    rep = REGISTRY["dw_stats"]
    for shift in (0.0, 3e-3):
        A, B, s = module_batch(5, r, *shape, seed=20 + r, negative=True)
        A, B = A + shift * 100, B + shift
        got = rep(A, B, s)
        ref = [ref_dw_stats(a, b, sc, rep.params) for a, b, sc in zip(A.numpy(), B.numpy(), s.numpy())]
        _assert_matches(got, ref, f"dw_stats r={r} factored={factored} shift={shift}")


def test_dw_stats_path_choice():
    """Factored while (in + out) t (t + r) <= in out (2 r + 16), t = r (r + 1) / 2; dense for large r."""
    assert reps._dw_moments_factored(8, 1280, 1280) and reps._dw_moments_factored(16, 1280, 1280)
    assert reps._dw_moments_factored(4, 320, 320) and not reps._dw_moments_factored(32, 1280, 1280)
    assert not reps._dw_moments_factored(16, 320, 320)


@pytest.mark.parametrize("factored", [True, False])
def test_dw_stats_constant_dw_has_no_spread(monkeypatch, factored):
    monkeypatch.setattr(reps, "_dw_moments_factored", lambda *s: factored)
    A, B = torch.full((2, 4, 24), 0.7), torch.full((2, 40, 4), 1e-3)
    out = REGISTRY["dw_stats"](A, B, torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(out[:, 0], torch.tensor([2.8e-3, -5.6e-3]))
    assert torch.equal(out[:, 1:], torch.zeros(2, 3))


def test_order_stats_are_a_sort_on_every_path(monkeypatch):
    x = torch.cat([tensor_batch(3, 7, 13, seed=15).flatten(1), torch.zeros(1, 91), torch.full((1, 91), float("nan"))])
    x[0, :5] = -0.0
    positions = [0, 3, 3, 45, 89, 90]
    want = torch.sort(x, 1).values[:, positions]
    for select_above in (10 ** 9, 1):  # numpy.sort, numpy.partition
        monkeypatch.setattr(reps, "_SELECT_ABOVE", select_above)
        got = reps._order_stats(x, positions)
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)) and got.dtype == x.dtype
        q = reps._quantiles(x[:4], reps.RANK_QUANTILES)
        assert torch.equal(q, torch.quantile(x[:4], torch.tensor(reps.RANK_QUANTILES), dim=1).T)
        assert torch.equal(reps._order_stats(x.double(), positions).nan_to_num(7.0), want.double().nan_to_num(7.0))


@pytest.mark.parametrize("name", MODULE)
def test_module_zero_padded_rank_changes_nothing(name):
    """The store zero-pads ragged ranks to the max rank: B A, hence every module feature, is unchanged."""
    A, B, s = module_batch(4, 2, 24, 40, seed=14)
    A4 = torch.cat([A, torch.zeros(4, 2, 24)], 1)
    B4 = torch.cat([B, torch.zeros(4, 40, 2)], 2)
    base = REGISTRY[name](A, B, s)
    torch.testing.assert_close(REGISTRY[name](A4, B4, s), base, rtol=1e-5, atol=1e-6 * base.abs().max().item())


def test_dw_probe_probes_depend_only_on_seed_count_and_width():
    p = reps._probes(0, 16, 24)
    assert torch.equal(p, reps._probes(0, 16, 24))
    assert not torch.equal(p, reps._probes(1, 16, 24))
    assert reps._probes(0, 16, 40).shape == (16, 40)


def test_dw_canonical_reconstructs_dw_at_full_k():
    """With k = r the factors are exact: U sqrt(S) (V sqrt(S))^T = dW (checks the signs via the stats)."""
    A, B, s = module_batch(4, 2, 16, 24, b_scale=1.0, seed=13, negative=True)
    rep = from_spec({"name": "dw_canonical", "version": 1, "configuration": {"k": 2}})
    out = rep(A, B, s).view(4, 2, 2, 5)  # (n, component, U/V, stats)
    norms_sq = out[..., 1] ** 2 * (torch.tensor([24, 16]) - 1) + out[..., 0] ** 2 * torch.tensor([24, 16])
    sv = REGISTRY["dw_spectrum"](A, B, s)[:, :2]
    torch.testing.assert_close(norms_sq, sv[:, :, None].expand(4, 2, 2), rtol=1e-4, atol=1e-6)
    assert (out[..., 0, 3] >= -out[..., 0, 2]).all()  # largest |entry| of U is positive


# --- registry, specs, errors ------------------------------------------------------------------------


def test_widths_and_order():
    assert {d["name"]: d["width"] for d in describe_all()} == {
        "simple_stats": 5, "rank_based": 11, "stats": 7, "spectral": 32, "matrix_norms": 7,
        "distribution": 12, "frequency": 14, "info_theoretic": 2, "ensemble": 67,
        "dw_spectrum": 8, "dw_norms": 5, "dw_stats": 4, "dw_probe": 16, "dw_canonical": 40, "dw_quantiles": 7,
    }
    assert [d["name"] for d in describe_all()] == list(REGISTRY)
    assert all(set(d) == {"name", "kind", "width", "invariance", "version", "opt_in"} for d in describe_all())
    assert [d["name"] for d in describe_all() if d["opt_in"]] == ["dw_quantiles"]
    assert get("dw_stats").version == 2 and get("dw_quantiles").version == 1


def test_resolve_leaves_opt_in_out_of_all_unless_named():
    default = [r for r in REGISTRY.values() if not r.opt_in]
    assert resolve("all") == default and get("dw_quantiles") not in default and len(default) == len(REGISTRY) - 1
    assert resolve("dw_quantiles") == [get("dw_quantiles")]
    assert resolve("all,dw_quantiles") == default + [get("dw_quantiles")]
    assert resolve(" dw_quantiles , all, stats") == [get("dw_quantiles")] + default
    assert resolve("stats,all") == [get("stats")] + [r for r in default if r.name != "stats"]
    assert resolve("all, all") == default
    assert from_spec(get("dw_quantiles").spec()).opt_in
    old = reps.Representation("x", 1, "tensor", 5, "none", reps.NoParams(), reps.simple_stats)  # positional, as before
    assert old.opt_in is False and old.spec() == {"name": "x", "version": 1, "configuration": {}}


def test_resolve_and_get():
    assert [r.name for r in resolve("all")] == [n for n, r in REGISTRY.items() if not r.opt_in]
    assert [r.name for r in resolve("spectral, stats,spectral")] == ["spectral", "stats"]
    with pytest.raises(PipelineError, match=r"unknown representation 'nope'; valid: simple_stats, rank_based"):
        resolve("stats,nope")
    with pytest.raises(PipelineError, match="unknown representation"):
        get("nope")
    with pytest.raises(PipelineError):
        resolve(" , ")


def test_from_spec_params_version_and_errors():
    rep = from_spec({"name": "dw_spectrum", "version": 1, "configuration": {"k": 3}})
    assert rep.width == 3 and rep.params.k == 3 and rep.spec_hash() != get("dw_spectrum").spec_hash()
    assert rep(*module_batch(2, 4, 16, 24)).shape == (2, 3)
    with pytest.raises(PipelineError, match="version"):
        from_spec({"name": "dw_spectrum", "version": 99, "configuration": {"k": 8}})
    with pytest.raises(PipelineError, match="configuration"):
        from_spec({"name": "dw_spectrum", "version": 1, "configuration": {"q": 3}})
    with pytest.raises(PipelineError, match="positive"):
        from_spec({"name": "dw_probe", "version": 1, "configuration": {"count": 0, "seed": 0}})
    with pytest.raises(PipelineError, match="not a representation spec"):
        from_spec({"name": "stats"})


def test_register_refuses_duplicates_and_bad_declarations():
    with pytest.raises(ValueError):
        register(get("stats"))
    with pytest.raises(ValueError):
        reps.Representation("x", 1, "module", 7, "none", reps.SpectrumParams(k=8), reps.dw_spectrum)
    with pytest.raises(ValueError):
        reps.Representation("x", 1, "pair", 8, "none", reps.SpectrumParams(), reps.dw_spectrum)


def test_scalar_scale_convenience():
    A, B, s = module_batch(3, 4, 16, 24)
    rep = get("dw_norms")
    assert torch.equal(rep(A, B, 2.0), rep(A, B, torch.full((3,), 2.0)))
    assert math.isclose(float(rep(A, B, 2.0)[0, 0]), 2 * float(rep(A, B, 1.0)[0, 0]), rel_tol=1e-6)


# --- batched linear algebra: spectra from float64 Gram matrices; the device paths -------------------


def conditioned(n, rows, cols, decades, seed, scale=1.0):
    """(n, rows, cols) float32 with singular values 10^0 ... 10^-decades (log-spaced), random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    m = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(n, rows, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, cols, m, generator=g, dtype=torch.float64))
    s = 10.0 ** torch.linspace(0, -decades, m, dtype=torch.float64)
    return (scale * (u * s) @ v.mT).float()


@pytest.mark.parametrize("r", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("decades", [0, 3, 6])
def test_singular_values_are_float64_accurate(r, decades):
    """Tensors and dW (condition up to 1e6): within 1 eps32 x s_0 of numpy's float64 SVD of the float32 values.

    The float64 Gram squares the condition number (1e12) and still resolves 1e-8 s_0: what is left is the
    float32 output's rounding. The QR path this replaced was off by up to ~12 eps32 x s_0 here."""
    eps = np.finfo(np.float32).eps
    x = conditioned(4, r, 160, decades, seed=r)
    for t in (x, x.mT.contiguous()):  # wide (down) and tall (up)
        ref = np.linalg.svd(t.double().numpy(), compute_uv=False)
        got = reps._svdvals(t).double().numpy()
        assert got.shape == ref.shape and (np.abs(got - ref) <= eps * ref[:, :1]).all(), np.abs(got - ref).max()
    A, B = conditioned(4, r, 96, decades, seed=10 + r), conditioned(4, 128, r, decades, seed=20 + r, scale=1e-3)
    scale = torch.tensor([-2.0, 0.5, 0.0, 1.5])
    ref = np.abs(scale.double().numpy())[:, None] * np.linalg.svd(B.double().numpy() @ A.double().numpy(), compute_uv=False)[:, :r]
    got = reps._dw_singular_values(A, B, scale).double().numpy()
    assert (np.abs(got - ref) <= eps * ref[:, :1] + 1e-30).all(), np.abs(got - ref).max()


@pytest.mark.parametrize("r", [2, 8, 16])
@pytest.mark.parametrize("name", ["dw_spectrum", "dw_norms", "dw_canonical"])
def test_module_spectra_reference_at_higher_rank(name, r):
    """The reference check beyond r = 4, and r > in (dW's rank is in: the rest are zeros)."""
    rep = REGISTRY[name]
    for shape in [(r, 24, 40), (r, 6, 40)]:
        A, B, s = module_batch(5, *shape, seed=30 + r, negative=True)
        ref = [REFERENCES[name](a, b, sc, rep.params) for a, b, sc in zip(A.numpy(), B.numpy(), s.numpy())]
        _assert_matches(rep(A, B, s), ref, f"{name} {shape}")


def test_zero_padded_ranks_give_exact_zero_singular_values():
    """The store zero-pads ragged ranks: the padding's singular values are exactly 0, as they were (not rounding)."""
    g = torch.Generator().manual_seed(16)
    A, B = torch.randn(4, 16, 320, generator=g), 1e-2 * torch.randn(4, 640, 16, generator=g)
    A[:, 5:], B[:, :, 5:] = 0, 0
    for t in (A, B):
        s = reps._svdvals(t)
        assert (s[:, :5] > 0).all() and torch.equal(s[:, 5:], torch.zeros(4, 11))
    s = reps._dw_singular_values(A, B, torch.ones(4))
    assert (s[:, :5] > 0).all() and torch.equal(s[:, 5:], torch.zeros(4, 11))


@pytest.mark.parametrize("r", [1, 4])
def test_zero_factors_give_exact_zeros(r):
    """An all-zero B (LoRA at init) or A: zeros from every spectrum, no NaN, tensor and module kind alike."""
    A, B, s = module_batch(3, r, 24, 40)
    for a, b in ((A, torch.zeros_like(B)), (torch.zeros_like(A), B), (torch.zeros_like(A), torch.zeros_like(B))):
        for name in MODULE:
            out = REGISTRY[name](a, b, s)
            assert torch.equal(out, torch.zeros_like(out)), name
    for name in ("spectral", "matrix_norms"):
        out = REGISTRY[name](torch.zeros(3, 40, r))
        assert torch.equal(out, torch.zeros_like(out)), name


def test_vector_norm_neither_overflows_nor_underflows():
    """The rank-1 closed forms: norms of float32 vectors whose squares overflow or underflow float32."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(6, 1, 300, generator=g) * torch.tensor([1.0, 1e30, 1e-30, 0.0, 1e-21, 3e19])[:, None, None]
    want = torch.linalg.vector_norm(x.double(), dim=2).float()
    for on_host in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(reps, "_on_host", lambda t, on_host=on_host: on_host)
            got = reps._vector_norm(x, 2)
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0)


def test_eigenvalues_at_m_1_are_the_entry():
    """The m = 1 shortcut of the Gram eigen-decompositions is what eigh returns (without a call per matrix)."""
    G = torch.rand(5, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    w, V = torch.linalg.eigh(G)
    assert torch.equal(reps._gram_eigvalsh(G), w) and torch.equal(reps._gram_eigh(G)[0], w)
    assert torch.equal(reps._gram_eigh(G)[1], V)


def _all_inputs(rep):
    if rep.kind == "tensor":
        shapes = TENSOR_SHAPES + [(8, 24)]
        return [(tensor_batch(5, *shape, seed=19),) for shape in shapes] + degenerate_inputs(rep)
    return [module_batch(5, *shape, seed=19, negative=True) for shape in MODULE_SHAPES + [(8, 24, 40)]] + degenerate_inputs(rep)


# Off the host these differ from the host's path by rounding only: float64 norms at rank 1, dw_stats' batch steps.
ROUNDED_OFF_THE_HOST = {"spectral", "matrix_norms", "ensemble", "dw_spectrum", "dw_norms", "dw_canonical", "dw_stats"}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_device_paths_give_the_host_numbers(name, monkeypatch):
    """What runs off the host (CUDA): torch.sort for numpy's, histogram bins without a branch on the values,
    float64 norms, dw_stats in one batch step. The same numbers (bit for bit, or within float32 rounding
    where the arithmetic differs), and the reference check on that path."""
    rep = REGISTRY[name]
    every = _all_inputs(rep)
    host = [rep(*inputs) for inputs in every]
    monkeypatch.setattr(reps, "_on_host", lambda t: False)
    monkeypatch.setattr(reps, "_MOMENT_CHUNK_ELEMENTS", 1)  # on the host: one adapter per dw_stats step
    for inputs, want in zip(every, host):
        got = rep(*inputs)
        if name in ROUNDED_OFF_THE_HOST:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()) + 1e-30)
        else:
            assert torch.equal(got, want), f"{name}: {[tuple(t.shape) for t in inputs]}"
    if rep.kind == "tensor":
        for shape in TENSOR_SHAPES:
            x = tensor_batch(5, *shape, seed=11)
            _assert_matches(rep(x), [REFERENCES[name](m) for m in x.numpy()], name)
    else:
        for shape in MODULE_SHAPES:
            A, B, s = module_batch(5, *shape, seed=12, negative=True)
            ref = [REFERENCES[name](a, b, sc, rep.params) for a, b, sc in zip(A.numpy(), B.numpy(), s.numpy())]
            _assert_matches(rep(A, B, s), ref, name)


def test_histogram_counts_off_the_host_are_numpy_exactly(monkeypatch):
    monkeypatch.setattr(reps, "_on_host", lambda t: False)
    test_histogram_counts_are_numpy_exactly()
    test_order_stats_are_a_sort_on_every_path(monkeypatch)


NO_CUDA = "SKIPPED, NOT RUN: needs a CUDA GPU and torch.cuda.is_available() is False here; run `pytest -m cuda` on a GPU machine"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("name", list(REGISTRY))
def test_cuda_gives_the_cpu_numbers(name):
    """The same inputs on CUDA: the CPU's numbers within float32 rounding (reductions run in another order there)."""
    rep = REGISTRY[name]
    for inputs in _all_inputs(rep):
        want = rep(*inputs)
        got = rep(*[t.cuda() for t in inputs])
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-30)
