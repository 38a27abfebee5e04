"""Registry of representations: pure, batched torch functions from LoRA weights to fixed-width features.

Two kinds. A *tensor* representation sees one stored tensor at a time (down and up alike):
``fn(x, params)`` with x (n, rows, cols) -> (n, width). These are the nine of the original
experiment, reproduced exactly (docs/representations.md). A *module* representation sees a down/up
pair: ``fn(A, B, scale, params)`` with A (n, r, in), B (n, out, r), scale (n,), dW = scale * B @ A
-> (n, width); all of them depend on dW only, so they are invariant to (B G^-1, G A).

Every function is pure (no I/O, no device moves of its input, no mutation), batched over n,
deterministic, picklable (module-level functions, frozen dataclass parameters) and returns float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import PipelineError
from .provenance import content_hash

EPS = 1e-8  # the original experiment's guard, kept wherever it changes the numbers
_HIST_BINS = 50
_SELECT_ABOVE = 1 << 16  # _order_stats: rows longer than this are selected (numpy.partition), not sorted
_DW_CHUNK_ELEMENTS = 1 << 24  # dw_quantiles (and dw_stats off the host) form at most this many dW entries at once
_MOMENT_CHUNK_ELEMENTS = 1 << 20  # dw_stats on the host: float64 intermediates alive per batch step (8 MB)

RANK_QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)
DIST_QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)
DW_QUANTILES = (0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99)
ENSEMBLE_PARTS = ("spectral", "matrix_norms", "distribution", "frequency", "info_theoretic")
GL_INVARIANT = "GL(r): (B G^-1, G A)"


def quantile_names(qs: tuple[float, ...]) -> tuple[str, ...]:
    """(0.01, 0.5) -> ("q01", "q50"): the feature names of quantiles."""
    return tuple(f"q{round(q * 100):02d}" for q in qs)


# ----------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class NoParams:
    """Parameters of a representation that has none."""


@dataclass(frozen=True)
class SpectrumParams:
    """k: how many singular values of dW to keep (zero-padded when rank < k)."""

    k: int = 8

    def __post_init__(self):
        _check_positive(self, "k")

    def width(self) -> int:
        return self.k

    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"s{i}" for i in range(self.k))


@dataclass(frozen=True)
class ProbeParams:
    """count Gaussian probes x_i ~ N(0, I_in), drawn from torch.Generator().manual_seed(seed)."""

    count: int = 16
    seed: int = 0

    def __post_init__(self):
        _check_positive(self, "count")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise PipelineError(f"dw_probe seed must be a non-negative integer, got {self.seed!r}")

    def width(self) -> int:
        return self.count

    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"probe{i}" for i in range(self.count))


@dataclass(frozen=True)
class CanonicalParams:
    """k: how many singular components of dW to describe (zero-padded when rank < k)."""

    k: int = 4

    def __post_init__(self):
        _check_positive(self, "k")

    def width(self) -> int:
        return 2 * _CANON_STATS * self.k

    def feature_names(self) -> tuple[str, ...]:
        """Component-major, as dw_canonical lays them out: u0_mean ... u0_deloc, v0_mean ... v0_deloc, u1_mean, ..."""
        return tuple(f"{side}{j}_{stat}" for j in range(self.k) for side in "uv" for stat in CANONICAL_STATS)


def _check_positive(params, field: str) -> None:
    value = getattr(params, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PipelineError(f"{type(params).__name__}.{field} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Representation:
    """A named, versioned, pure feature function; see the module docstring for the two kinds."""

    name: str
    version: int  # bump when the output changes
    kind: str  # "tensor" or "module"
    width: int  # features per tensor (tensor kind) or per module (module kind)
    invariance: str
    params: object  # a frozen dataclass instance
    fn: Callable
    opt_in: bool = False  # True: costly, computed only when named ("all" leaves it out)
    # What each of the ``width`` output columns is, in order; empty when the params define them (feature_names()).
    features: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ("tensor", "module"):
            raise ValueError(f"representation {self.name!r}: kind must be 'tensor' or 'module', got {self.kind!r}")
        if not dataclasses.is_dataclass(self.params) or not type(self.params).__dataclass_params__.frozen:
            raise ValueError(f"representation {self.name!r}: params must be a frozen dataclass instance")
        declared = getattr(self.params, "width", None)
        if declared is not None and declared() != self.width:
            raise ValueError(f"representation {self.name!r}: width {self.width} but params give {declared()}")
        names = self.feature_names()
        if names and (len(names) != self.width or len(set(names)) != len(names)):
            raise ValueError(f"representation {self.name!r}: width {self.width} needs as many distinct feature names, "
                             f"got {len(names)} ({len(set(names))} distinct)")

    def feature_names(self) -> list[str]:
        """The name of each output column, in order (the ``<name>_feature`` coordinate of pipeline.open_features)."""
        from_params = getattr(self.params, "feature_names", None)
        return list(from_params() if from_params is not None else self.features)

    def spec(self) -> dict:
        return {"name": self.name, "version": self.version, "configuration": dataclasses.asdict(self.params)}

    def spec_hash(self) -> str:
        return content_hash(self.spec(), length=16)

    def __call__(self, *tensors):
        if self.kind == "tensor":
            (x,) = tensors
            return self.fn(x, self.params)
        A, B, scale = tensors
        if not torch.is_tensor(scale) or scale.dim() == 0:  # convenience: one scale for the batch
            scale = torch.full((A.shape[0],), float(scale), dtype=torch.float32, device=A.device)
        return self.fn(A, B, scale, self.params)


REGISTRY: dict[str, Representation] = {}


def register(rep: Representation) -> Representation:
    """Add rep to REGISTRY under its name (once); it must name its features (``features`` or params.feature_names())."""
    if rep.name in REGISTRY:
        raise ValueError(f"representation {rep.name!r} is already registered")
    if not rep.feature_names():
        raise ValueError(f"representation {rep.name!r} names none of its {rep.width} features; pass features=(...)")
    REGISTRY[rep.name] = rep
    return rep


def _unknown(name: str) -> PipelineError:
    return PipelineError(f"unknown representation {name!r}; valid: {', '.join(REGISTRY)}")


def get(name: str) -> Representation:
    """The registered representation called name."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise _unknown(name) from None


def resolve(names: str) -> list[Representation]:
    """Comma-separated names, in the order given, once each; the token 'all' stands for every
    registered representation that is not opt-in, in registry order. An opt-in representation is
    computed only when named: 'all' leaves dw_quantiles out, 'all,dw_quantiles' adds it."""
    wanted = [part.strip() for part in names.split(",") if part.strip()]
    if not wanted:
        raise PipelineError(f"no representation named; valid: all, {', '.join(REGISTRY)}")
    chosen: dict[str, Representation] = {}
    for name in wanted:
        for rep in ([r for r in REGISTRY.values() if not r.opt_in] if name == "all" else [get(name)]):
            chosen.setdefault(rep.name, rep)
    return list(chosen.values())


def from_spec(spec: dict) -> Representation:
    """The representation that spec() describes; refuses a version this code does not compute."""
    try:
        name, version, configuration = spec["name"], spec["version"], spec["configuration"]
    except (TypeError, KeyError):
        raise PipelineError(f"not a representation spec: {spec!r}") from None
    base = get(name)
    if version != base.version:
        raise PipelineError(
            f"representation {name!r} was stored as version {version}; this code computes version "
            f"{base.version}: recompute the features"
        )
    try:
        params = dataclasses.replace(base.params, **dict(configuration))
    except TypeError as err:
        raise PipelineError(f"bad configuration for representation {name!r}: {configuration!r} ({err})") from None
    width = params.width() if hasattr(params, "width") else base.width
    return dataclasses.replace(base, params=params, width=width)


def describe_all() -> list[dict]:
    """One row per registered representation: name, kind, width, invariance, version, opt_in."""
    return [
        {"name": r.name, "kind": r.kind, "width": r.width, "invariance": r.invariance, "version": r.version,
         "opt_in": r.opt_in}
        for r in REGISTRY.values()
    ]


# ----------------------------------------------------------------------------------------------
# Shared helpers (all batched over the first dimension)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """float32/float64 stay; half precision and integers are computed in float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _finish(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (n,) / (n, k) parts to (n, width) float32; +-inf from overflow becomes +-max."""
    out = torch.cat([p.unsqueeze(1) if p.dim() == 1 else p for p in parts], dim=1).to(torch.float32)
    big = torch.finfo(torch.float32).max
    return out.clamp(-big, big)  # NaN (only from NaN input) stays visible


def _pad_cols(v: torch.Tensor, k: int) -> torch.Tensor:
    """(n, m) -> (n, k): the first k columns, zero-padded on the right when m < k."""
    v = v[:, :k]
    if v.shape[1] < k:
        v = torch.cat([v, v.new_zeros(v.shape[0], k - v.shape[1])], dim=1)
    return v


def _on_host(t: torch.Tensor) -> bool:
    """Whether t is in host memory, where numpy's sort and a branch on a value cost no copy; on a device
    (CUDA) either would copy to the host and wait for it, so the device paths take neither (same numbers)."""
    return t.device.type == "cpu"


def _mean_std(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased std of (n, m); std is 0 for a single element (not NaN)."""
    mean = flat.mean(1)
    if flat.shape[1] < 2:
        return mean, torch.zeros_like(mean)
    return mean, flat.std(1, correction=1)


def _skew_kurt(flat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of z^3 and z^4 with z = (x - mean) / (std + 1e-8); kurtosis is not excess."""
    z = (flat - mean[:, None]) / (std[:, None] + EPS)
    z2 = z * z
    return (z2 * z).mean(1), (z2 * z2).mean(1)


def _quantile_positions(m: int, qs: tuple[float, ...], dtype: torch.dtype):
    """torch.quantile's linear interpolation for m values: (below, above, weight) per q.

    Ranks are computed as torch does: q * (m - 1) in the input dtype, floor / ceil, weight = rank - floor.
    """
    ranks = torch.tensor(qs, dtype=dtype) * (m - 1)
    below = ranks.long()
    return below, ranks.ceil().long(), ranks - below.to(dtype)


def _quantiles_sorted(s: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """Linear-interpolation quantiles of each row of the ascending (n, m) s: torch.quantile's arithmetic.

    torch.quantile refuses inputs above 16M elements and sorts once per call; this sorts once for all
    quantiles.
    """
    below, above, weight = _quantile_positions(s.shape[1], qs, s.dtype)
    return torch.lerp(s[:, below.to(s.device)], s[:, above.to(s.device)], weight.to(s.device))


def _order_stats(flat: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """(n, m) -> (n, len(positions)): the values at those 0-based positions of each row sorted ascending.

    Exactly sort(flat)[:, positions] (NaN sorts last in both). On the CPU numpy does it: its SIMD sort
    is ~4x faster than torch.sort on rows of ~1e3 floats, and above _SELECT_ABOVE entries per row a
    selection of only the positions needed (numpy.partition, all of them in one call) beats any sort.
    Elsewhere (CUDA) one torch.sort.
    """
    positions = [int(p) for p in positions]
    if _on_host(flat) and flat.dtype in (torch.float32, torch.float64) and not flat.requires_grad:
        a = flat.numpy()
        if flat.shape[1] > _SELECT_ABOVE:
            a = np.partition(a, sorted(set(positions)), axis=1)
        else:
            a = np.sort(a, axis=1)
        return torch.from_numpy(np.ascontiguousarray(a[:, positions]))
    idx = torch.tensor(positions, dtype=torch.long, device=flat.device)
    return torch.sort(flat, dim=1).values[:, idx]


def _quantiles(flat: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """_quantiles_sorted(sort(flat), qs) bit for bit, by selection of only the order statistics needed."""
    below, above, weight = _quantile_positions(flat.shape[1], qs, flat.dtype)
    k = len(qs)
    picked = _order_stats(flat, below.tolist() + above.tolist())
    return torch.lerp(picked[:, :k], picked[:, k:], weight.to(flat.device))


def _vector_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norms along dim, in x's dtype, safe from the overflow and underflow of float32 squares.

    LAPACK's nrm2 scales. Here the float32 norm stands where its squares can neither have overflowed
    (above ~1.8e19 the norm is inf) nor lost digits below ~1e-19 (a norm under 1e-10 of a row that is
    not all zeros: an all-zero row, a LoRA B at init, is exact); the other rows are recomputed from
    float64 squares. Only those on the host (a float64 copy of every row costs ~8x the float32 norm);
    off the host every norm is float64 (no branch on values).
    """
    if not _on_host(x) or x.dtype != torch.float32:
        return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float64).to(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=dim)
    risky = ~(norm < math.inf)  # overflow (or NaN)
    small = norm < 1e-10
    if bool(small.any()):
        risky |= small & ((x.amax(dim) > 0) | (x.amin(dim) < 0))
    if bool(risky.any()):
        norm[risky] = torch.linalg.vector_norm(x.movedim(dim, -1)[risky], dim=-1, dtype=torch.float64).to(x.dtype)
    return norm


def _gram_eigvalsh(G: torch.Tensor) -> torch.Tensor:
    """(n, m, m) symmetric PSD float64 -> (n, m) eigenvalues, descending, clamped at 0.

    One batched eigvalsh (cuSOLVER's batched Jacobi on CUDA up to m = 32: no call per matrix). At m = 1
    the eigenvalue is the entry itself, which is what eigvalsh returns, without a LAPACK call per matrix.
    The clamp removes the rounding of zero eigenvalues (rank-deficient or zero matrices) to +-eps ||G||.
    """
    w = G[..., 0] if G.shape[-1] == 1 else torch.linalg.eigvalsh(G).flip(-1)
    return w.clamp(min=0)


def _gram_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_gram_eigvalsh(G) and the eigenvectors, as columns in the same order: (n, m), (n, m, m)."""
    if G.shape[-1] == 1:
        return G[..., 0].clamp(min=0), torch.ones_like(G)
    w, V = torch.linalg.eigh(G)
    return w.flip(-1).clamp(min=0), V.flip(-1)


def _svdvals(x: torch.Tensor) -> torch.Tensor:
    """Singular values of each (rows, cols) matrix, descending: (n, min(rows, cols)), in x's dtype.

    The square roots of the eigenvalues of the float64 Gram matrix of the short side (m x m, m =
    min(rows, cols): r for a LoRA factor), so one batched call whatever the long side (QR and SVD run
    one cuSOLVER call per matrix above 32 or 256 rows). The Gram squares the condition number, hence
    float64: products of float32 entries are exact there, and a singular value's error is about
    sqrt(eps64) s_0 = 1.5e-8 s_0 at worst, below float32's rounding of s_0. A vector (m = 1): its norm.
    """
    if min(x.shape[-2:]) == 1:  # one singular value: the norm
        return _vector_norm(x.flatten(1), 1)[:, None]
    x64 = x.to(torch.float64)
    gram = x64 @ x64.mT if x.shape[-2] <= x.shape[-1] else x64.mT @ x64
    return _gram_eigvalsh(gram).sqrt().to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Tensor kind: the nine representations of the original experiment


SIMPLE_STATS = ("l2", "mean", "std", "max", "min")


def simple_stats(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 5): L2 norm of flat, mean, std, max, min."""
    flat = _as_float(x).flatten(1)
    mean, std = _mean_std(flat)
    return _finish([torch.linalg.vector_norm(flat, dim=1), mean, std, flat.amax(1), flat.amin(1)])


RANK_BASED = (*quantile_names(RANK_QUANTILES), "iqr", "q99_minus_q01")


def rank_based(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 11): 9 quantiles, q.75 - q.25, q.99 - q.01."""
    q = _quantiles(_as_float(x).flatten(1), RANK_QUANTILES)
    return _finish([q, q[:, 5] - q[:, 3], q[:, 8] - q[:, 0]])


STATS = ("mean", "std", "median", "min", "max", "skew", "kurt")


def stats(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 7): mean, std, median (lower middle), min, max, skew, kurtosis."""
    flat = _as_float(x).flatten(1)
    mean, std = _mean_std(flat)
    median = _order_stats(flat, [(flat.shape[1] - 1) // 2])[:, 0]
    skew, kurt = _skew_kurt(flat, mean, std)
    return _finish([mean, std, median, flat.amin(1), flat.amax(1), skew, kurt])


# s_i; p_i = s_i / sum; gap_i = (s_i - s_i+1) / s_i; entropy of p; condition = s0 / s9; sum of s
SPECTRAL = (*(f"s{i}" for i in range(10)), *(f"p{i}" for i in range(10)), *(f"gap{i}" for i in range(9)),
            "entropy", "condition", "sum")


def spectral(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 32): top-10 singular values (zero-padded), normalised, 9 gaps, entropy, s0/s9, sum."""
    return _spectral_of(_svdvals(_as_float(x)))


def _spectral_of(sv: torch.Tensor) -> torch.Tensor:
    s = _pad_cols(sv, 10)
    total = s.sum(1)
    p = s / (total[:, None] + EPS)
    gaps = (s[:, :-1] - s[:, 1:]) / (s[:, :-1] + EPS)
    entropy = -(p * torch.log(p + EPS)).sum(1)
    condition = s[:, 0] / (s[:, 9] + EPS)  # ~ s0 * 1e8 at rank < 10: faithful to the original
    return _finish([s, p, gaps, entropy, condition, total])


MATRIX_NORMS = ("fro", "nuclear", "spectral", "max_col_abs_sum", "max_row_abs_sum", "nuclear_over_fro", "spectral_over_fro")


def matrix_norms(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 7): Frobenius, nuclear, spectral, max col abs-sum, max row abs-sum, 2 ratios."""
    x = _as_float(x)
    return _matrix_norms_of(x, _svdvals(x))


def _matrix_norms_of(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    fro = torch.linalg.vector_norm(x.flatten(1), dim=1)
    nuclear, spec = s.sum(1), s[:, 0]
    absx = x.abs()
    max_col = absx.sum(1).amax(1)  # sum over rows, per column
    max_row = absx.sum(2).amax(1)
    return _finish([fro, nuclear, spec, max_col, max_row, nuclear / (fro + EPS), spec / (fro + EPS)])


DISTRIBUTION = (*quantile_names(DIST_QUANTILES), "iqr", "mean_abs_dev", "std_over_abs_mean", "skew", "kurt")


def distribution(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 12): 7 quantiles, IQR, mean abs deviation, std/|mean|, skew, kurtosis."""
    return _distribution_of(_as_float(x).flatten(1))


def _distribution_of(flat: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(flat)
    q = _quantiles(flat, DIST_QUANTILES)
    mad = (flat - mean[:, None]).abs().mean(1)
    skew, kurt = _skew_kurt(flat, mean, std)
    return _finish([q, q[:, 4] - q[:, 2], mad, std / (mean.abs() + EPS), skew, kurt])


FREQUENCY = (*(f"top{i}" for i in range(10)), "mean", "std", "max", "top10_energy_share")


def frequency(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 14): |FFT2| top 10 (descending, zero-padded), mean, population std, max, energy share."""
    mag = torch.fft.fft2(_as_float(x)).abs().flatten(1)
    top = _pad_cols(torch.topk(mag, min(10, mag.shape[1]), dim=1).values, 10)
    share = (top * top).sum(1) / ((mag * mag).sum(1) + EPS)
    return _finish([top, mag.mean(1), mag.std(1, correction=0), mag.amax(1), share])


def _histogram_counts(flat: torch.Tensor, bins: int = _HIST_BINS) -> torch.Tensor:
    """(n, m) -> (n, bins) int64 counts, numpy.histogram(row, bins) exactly, on any device.

    Edges as numpy builds them in the row's dtype: range [min, max] ([min - 0.5, max + 0.5] when
    max == min), edge_k = k * ((last - first) / bins) + first, the last edge set to last. A value
    goes to bin k when edge_k <= v < edge_{k+1}; the last bin is closed. The bin is computed as numpy
    does (floor((v - first) / step), then one correction each way against the edges) and checked
    against the edges: when any value fails the check (NaN, degenerate edges) the whole batch is
    binned by searchsorted instead, which is the definition (the arithmetic is 2x faster). Off the host
    (_on_host) every value is binned both ways and the checked one kept: the same counts with no copy to
    the host. Integer counts keep scatter_add deterministic on CUDA.
    """
    lo, hi = flat.amin(1), flat.amax(1)
    same = lo == hi
    first = torch.where(same, lo - 0.5, lo)
    last = torch.where(same, hi + 0.5, hi)
    step = (last - first) / bins
    k = torch.arange(bins + 1, dtype=flat.dtype, device=flat.device)
    edges = k[None, :] * step[:, None] + first[:, None]
    edges = torch.cat([edges[:, :-1], last[:, None]], dim=1).contiguous()
    guess = torch.nan_to_num((flat - first[:, None]) / step[:, None], nan=0.0, posinf=bins - 1, neginf=0.0)
    idx = guess.clamp_(0, bins - 1).long()
    idx -= (flat < edges.gather(1, idx)).long()
    idx.clamp_(min=0)
    idx += ((flat >= edges.gather(1, idx + 1)) & (idx < bins - 1)).long()
    ok = ((edges.gather(1, idx) <= flat) | (idx == 0)) & ((flat < edges.gather(1, idx + 1)) | (idx == bins - 1))
    if not _on_host(flat):  # asking whether any value failed would be a copy to the host: bin every value both ways
        idx = torch.where(ok, idx, (torch.searchsorted(edges, flat.contiguous(), right=True) - 1).clamp(0, bins - 1))
    elif not bool(ok.all()):
        idx = (torch.searchsorted(edges, flat.contiguous(), right=True) - 1).clamp(0, bins - 1)
    counts = torch.zeros(flat.shape[0], bins, dtype=torch.int64, device=flat.device)
    return counts.scatter_add(1, idx, torch.ones_like(idx))


INFO_THEORETIC = ("entropy", "entropy_over_ln50")


def info_theoretic(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 2): entropy of the 50-bin histogram over [min, max], and it / ln 50."""
    return _info_theoretic_of(_as_float(x).flatten(1))


def _info_theoretic_of(flat: torch.Tensor) -> torch.Tensor:
    counts = _histogram_counts(flat).to(flat.dtype)
    p = counts / counts.sum(1, keepdim=True)
    entropy = -(p * torch.log(p + EPS)).sum(1)
    return _finish([entropy, entropy / math.log(_HIST_BINS)])


def _ensemble_names() -> tuple[str, ...]:
    parts = {"spectral": SPECTRAL, "matrix_norms": MATRIX_NORMS, "distribution": DISTRIBUTION, "frequency": FREQUENCY,
             "info_theoretic": INFO_THEORETIC}
    return tuple(f"{part}.{name}" for part in ENSEMBLE_PARTS for name in parts[part])


ENSEMBLE = _ensemble_names()  # "spectral.s0", ..., "info_theoretic.entropy_over_ln50"


def ensemble(x: torch.Tensor, params: NoParams) -> torch.Tensor:
    """(n, rows, cols) -> (n, 67): spectral, matrix_norms, distribution, frequency, info_theoretic.

    The same numbers as the five parts, with the singular values computed once."""
    x = _as_float(x)
    sv, flat = _svdvals(x), x.flatten(1)
    parts = [_spectral_of(sv), _matrix_norms_of(x, sv), _distribution_of(flat), frequency(x, params), _info_theoretic_of(flat)]
    return torch.cat(parts, 1)


# ----------------------------------------------------------------------------------------------
# Module kind: functions of dW = scale * B @ A only, hence invariant to (B G^-1, G A)


def _dw_gram(A: torch.Tensor, B: torch.Tensor):
    """The factored Gram form of dW = B A, float64: (A, B, L, G_B, M), never forming dW.

    A A^T = V D V^T (eigh), L = V D^(1/2), so A = L Q^T with Q^T = L^+ A orthonormal on the range of A
    and sigma(B A) = sigma(B L); G_B = B^T B and M = L^T G_B L (r x r), whose eigenvalues are sigma(dW / scale)^2.
    Shapes: A (n, r, in), B (n, out, r), L, G_B, M (n, r, r). Cost O((in + out) r^2 + r^3); two batched
    r x r eigen-decompositions in all (this one, and M's by the caller). A zero or rank-deficient A gives
    zero columns of L (its eigenvalues clamped at 0), hence zero rows of M: no division, no NaN.
    """
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    d, V = _gram_eigh(A64 @ A64.mT)
    L = V * d.sqrt()[:, None, :]
    gram_b = B64.mT @ B64
    return A64, B64, L, gram_b, L.mT @ gram_b @ L


def _dw_singular_values(A, B, scale):
    """(n, r) singular values of dW, descending (zeros beyond its rank), never forming dW."""
    A, B = _as_float(A), _as_float(B)
    if A.shape[1] == 1:  # rank 1: ||a|| ||b||
        s = _vector_norm(A, 2) * _vector_norm(B, 1)
    else:
        *_, M = _dw_gram(A, B)
        s = _gram_eigvalsh(M).sqrt().to(A.dtype)
    return scale.to(A.dtype).abs()[:, None] * s


def _dw_factors(A, B, k: int):
    """The top-k' = min(k, r) singular triplets of B A: s (n, k'), U (n, out, k'), V (n, in, k'), B A = U S V^T.

    Rank 1: s = ||a|| ||b||, u = b / ||b||, v = a / ||a|| (in the input's dtype). Otherwise from the Gram
    form (_dw_gram), float64: M = W S^2 W^T (eigh), u_j = B L w_j / s_j and v_j = (B A)^T u_j / s_j =
    A^T G_B L w_j / s_j^2: no inverse of the factors, and for s_j = 0 (beyond the rank, dW = 0) u_j = v_j = 0.
    """
    if A.shape[1] == 1:
        na, nb = _vector_norm(A, 2), _vector_norm(B, 1)  # (n, 1)
        u = B / torch.where(nb > 0, nb, 1)[:, None, :]
        v = A.mT / torch.where(na > 0, na, 1)[:, None, :]
        return na * nb, u, v
    A64, B64, L, gram_b, M = _dw_gram(A, B)
    lam, W = _gram_eigh(M)
    s = lam[:, :k].sqrt()
    lw = L @ W[:, :, :k]  # (n, r, k')
    safe = torch.where(s > 0, s, 1)[:, None, :]  # s_j = 0: B L w_j = 0 as well
    return s, (B64 @ lw) / safe, (A64.mT @ (gram_b @ lw)) / (safe * safe)


def dw_spectrum(A, B, scale, params: SpectrumParams) -> torch.Tensor:
    """(n, r, in), (n, out, r), (n,) -> (n, k): top-k singular values of dW, zero-padded."""
    return _finish([_pad_cols(_dw_singular_values(A, B, scale), params.k)])


DW_NORMS = ("fro", "spectral", "nuclear", "stable_rank", "entropy")


def dw_norms(A, B, scale, params: NoParams) -> torch.Tensor:
    """-> (n, 5): Frobenius, spectral, nuclear norm of dW, stable rank, spectral entropy (0 when dW = 0)."""
    s = _dw_singular_values(A, B, scale)
    fro = torch.linalg.vector_norm(s, dim=1)
    spec, nuclear = s[:, 0], s.sum(1)
    nonzero = spec > 0
    stable_rank = torch.where(nonzero, (fro / torch.where(nonzero, spec, 1)) ** 2, 0)
    p = s / torch.where(nuclear > 0, nuclear, 1)[:, None]
    entropy = -torch.special.xlogy(p, p).sum(1)
    return _finish([fro, spec, nuclear, stable_rank, entropy])


def _dw_moments_factored(rank: int, fan_in: int, fan_out: int) -> bool:
    """Whether dw_stats contracts factor moment tensors (True) or forms dW chunk-wise (False).

    Flop counts per adapter with t = r (r + 1) / 2: factored ~ (in + out) t (t + r), dense ~
    in out (2 r + 16) (the GEMM plus the power sums). On a 2-core CPU the factored path wins at
    r <= 8 everywhere and at r = 16 on 1280 x 1280; the dense one at r >= 32 (r^4 growth) and at
    r = 16 on small modules. Both are exact (float64).
    """
    t = rank * (rank + 1) // 2
    return (fan_in + fan_out) * t * (t + rank) <= fan_in * fan_out * (2 * rank + 16)


def _factored_power_sums(U: torch.Tensor, V: torch.Tensor):
    """Raw power sums S_p = sum_ij X_ij^p, p = 2, 3, 4, of X = U^T V without forming X; and a rounding scale.

    U (n, r, out), V (n, r, in), float64 (the rows of B^T and A). Symmetric form of the factor moment
    tensors: with P_i = (u_ki u_li)_{k <= l} (t = r (r + 1) / 2 entries, rows of P below), Q_j alike,
    and c_kl = 2 - [k = l], X_ij^2 = sum_kl c_kl P_i,kl Q_j,kl, so S2 = <U U^T, V V^T>,
    S3 = <c (P U^T), Q V^T>, S4 = <c c^T (P P^T), Q Q^T> (Frobenius products of (r, r), (t, r), (t, t)
    matrices): the r^3 and r^4 tensors sum_i u_ki u_li u_pi (u_qi) contracted with their V
    counterparts, in about half the flops. Cost O((in + out) t^2).
    The scale (sum_k ||U_k|| ||V_k||)^2 bounds |S1|^2 / N, S2 and every term of the S2 contraction.
    """
    r = U.shape[1]
    P = torch.cat([U[:, k:k + 1] * U[:, k:] for k in range(r)], 1)  # (n, t, out), pairs in triu order
    Q = torch.cat([V[:, k:k + 1] * V[:, k:] for k in range(r)], 1)
    first, second = torch.triu_indices(r, r, device=U.device)  # the same pairs, made on the device
    c = 2 - (first == second).to(U.dtype)
    gu, gv = U @ U.mT, V @ V.mT
    s2 = (gu * gv).sum((1, 2))
    s3 = ((P @ U.mT) * (Q @ V.mT) * c[:, None]).sum((1, 2))
    s4 = ((P @ P.mT) * (Q @ Q.mT) * (c[:, None] * c)).sum((1, 2))
    norms = (gu.diagonal(dim1=1, dim2=2).clamp(min=0) * gv.diagonal(dim1=1, dim2=2).clamp(min=0)).sqrt()
    return s2, s3, s4, norms.sum(1) ** 2


DW_STATS = ("mean", "std", "skew", "kurt")


def dw_stats(A, B, scale, params: NoParams) -> torch.Tensor:
    """-> (n, 4): mean, std, skew, kurtosis of the N = out x in entries of dW, exact, without a sort.

    Float64 throughout. mean = s (1^T B)(A 1) / N. Raw power sums S2, S3, S4 of dW from the factor
    moment tensors (_factored_power_sums: O((in + out) r^4), dW never formed), turned into central
    moments M_p; or, when that is cheaper (_dw_moments_factored: large r, small modules), central sums
    straight from dW formed chunk-wise. std is unbiased; skew = M3 / (std + 1e-8)^3 and kurt =
    M4 / (std + 1e-8)^4, i.e. mean z^3, z^4 with z = (x - mean) / (std + 1e-8) (kurtosis not excess).
    A central M2 within rounding of zero (a constant dW) gives std = skew = kurt = 0.

    Batch steps: _dw_stats_step (cache-sized on the host; off it, the whole batch when factored).
    """
    n, r, fan_in = A.shape
    fan_out = B.shape[1]
    N = fan_in * fan_out
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    s64 = scale.to(torch.float64)
    mean = s64 * (B64.sum(1) * A64.sum(2)).sum(1) / N
    if n == 0:
        return A.new_zeros(0, 4, dtype=torch.float32)
    factored = _dw_moments_factored(r, fan_in, fan_out)
    step = _dw_stats_step(n, r, fan_in, fan_out, factored, _on_host(A))
    sums = []
    for start in range(0, n, step):  # steps of the batch, not samples
        sl = slice(start, start + step)
        if factored:
            sums.append(torch.stack(_factored_power_sums(s64[sl, None, None] * B64[sl].mT, A64[sl]), 1))
            continue
        X = (s64[sl, None, None] * (B64[sl] @ A64[sl]) - mean[sl, None, None]).flatten(1)
        X2 = X * X
        dot = lambda a, b: (a[:, None, :] @ b[:, :, None]).flatten()  # noqa: E731 (no temporary)
        sums.append(torch.stack([X2.sum(1), dot(X2, X), dot(X2, X2), torch.zeros_like(X[:, 0])], 1))
    s2, s3, s4, bound = torch.cat(sums).unbind(1)
    if factored:  # raw -> central moments (per entry)
        mu = mean
        m2 = s2 / N - mu * mu
        m3 = s3 / N - 3 * mu * (s2 / N) + 2 * mu ** 3
        m4 = s4 / N - 4 * mu * (s3 / N) + 6 * mu * mu * (s2 / N) - 3 * mu ** 4
        tol = 8 * (max(fan_in, fan_out) + r * r) * torch.finfo(torch.float64).eps * bound / N
    else:
        m2, m3, m4, tol = s2 / N, s3 / N, s4 / N, bound
    const = (m2 <= tol) | (N < 2)  # a constant dW (or one entry): its spread is rounding
    std = torch.where(const, 0, m2.clamp(min=0) * (N / max(N - 1, 1))).sqrt()
    skew = torch.where(const, 0, m3 / (std + EPS) ** 3)
    kurt = torch.where(const, 0, m4.clamp(min=0) / (std + EPS) ** 4)
    return _finish([mean, std, skew, kurt])


def _dw_stats_step(n: int, r: int, fan_in: int, fan_out: int, factored: bool, on_host: bool) -> int:
    """Adapters per batch step of dw_stats.

    On the host, steps of _MOMENT_CHUNK_ELEMENTS float64 intermediates: they stay in cache (the whole
    batch at once is ~2x slower on a CPU). Off the host, one launch per operator whatever the batch:
    the whole batch in the factored form (float64 intermediates ~2 (r + 1) times the input), and
    _DW_CHUNK_ELEMENTS entries of dW per step in the dense one (a memory bound).
    """
    per_sample = 2 * (fan_in + fan_out) * (r * (r + 1) // 2 + r) if factored else 2 * fan_in * fan_out
    if on_host:
        return max(1, _MOMENT_CHUNK_ELEMENTS // max(per_sample, 1))
    return max(n, 1) if factored else max(1, _DW_CHUNK_ELEMENTS // max(fan_in * fan_out, 1))


DW_QUANTILE_NAMES = quantile_names(DW_QUANTILES)


def dw_quantiles(A, B, scale, params: NoParams) -> torch.Tensor:
    """-> (n, 7): quantiles .01 .05 .25 .5 .75 .95 .99 of dW's entries (linear interpolation, torch.quantile's).

    Opt-in: O(in out) per adapter. dW is formed in the input's dtype a chunk of the batch at a time, at
    most _DW_CHUNK_ELEMENTS entries at once; the 14 order statistics come from one selection per
    chunk (_order_stats), not a sort.
    """
    A, B = _as_float(A), _as_float(B)
    scale = scale.to(A.dtype)
    per_sample = B.shape[1] * A.shape[2]
    step = max(1, _DW_CHUNK_ELEMENTS // max(per_sample, 1))
    outs = [A.new_zeros(0, len(DW_QUANTILES), dtype=torch.float32)]
    for start in range(0, A.shape[0], step):
        sl = slice(start, start + step)
        flat = (scale[sl, None, None] * (B[sl] @ A[sl])).flatten(1)
        outs.append(_finish([_quantiles(flat, DW_QUANTILES)]))
    return torch.cat(outs, 0)


def _probes(seed: int, count: int, in_features: int) -> torch.Tensor:
    """(count, in) float32 N(0, 1) probes on the CPU, a fixed function of (seed, count, in)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(count, in_features, generator=gen, dtype=torch.float32)


def dw_probe(A, B, scale, params: ProbeParams) -> torch.Tensor:
    """-> (n, count): ||dW x_i|| for fixed seeded probes x_i ~ N(0, I_in), in probe order (unsorted).

    E ||dW x||^2 = ||dW||_F^2. Unsorted because the probes are the same for every adapter of a given
    in-width, so feature i is one fixed function of dW^T dW across the dataset; sorting would keep
    only their distribution. Cost O((in + out) r count); dW is never formed.
    """
    A, B = _as_float(A), _as_float(B)
    x = _probes(params.seed, params.count, A.shape[2]).to(device=A.device, dtype=A.dtype)
    y = B @ (A @ x.T)  # (n, out, count)
    return _finish([scale.to(A.dtype).abs()[:, None] * torch.linalg.vector_norm(y, dim=1)])


CANONICAL_STATS = ("mean", "std", "min", "max", "deloc")  # per factor column; deloc = ||c||_1 / (sqrt(d) ||c||_2)
_CANON_STATS = len(CANONICAL_STATS)


def _column_stats(f: torch.Tensor) -> torch.Tensor:
    """(n, d, k) -> (n, k, 5): per column mean, unbiased std, min, max, ||c||_1 / (sqrt(d) ||c||_2) (0 if c = 0)."""
    d = f.shape[1]
    mean = f.mean(1)
    std = f.std(1, correction=1) if d > 1 else torch.zeros_like(mean)
    l2 = torch.linalg.vector_norm(f, dim=1)
    l1 = f.abs().sum(1)
    deloc = torch.where(l2 > 0, l1 / (math.sqrt(d) * torch.where(l2 > 0, l2, 1)), 0)
    return torch.stack([mean, std, f.amin(1), f.amax(1), deloc], dim=2)


def dw_canonical(A, B, scale, params: CanonicalParams) -> torch.Tensor:
    """-> (n, 10 k): per top-k component j of dW, stats of U_j sqrt(s_j) then of V_j sqrt(s_j).

    The top-k singular triplets of B A from _dw_factors (its Gram form, float64; closed forms at rank 1).
    Signs: the largest-|.| entry of each U column is made positive and V flipped the same way (and by
    sign(scale)), so dW = U S V^T. Components with s_j <= s_0 * max(in, out) * eps32 (numerical zeros
    at the float32 output's resolution, and all of them when dW = 0) and components beyond the rank
    give zeros. Stats per column (5): mean, std, min, max, ||c||_1 / (sqrt(d) ||c||_2); independent of in/out.
    """
    A, B = _as_float(A), _as_float(B)
    s, u, v = _dw_factors(A, B, params.k)
    pick = u.abs().argmax(1, keepdim=True)
    sign = torch.gather(u, 1, pick).sign()
    sign = torch.where(sign == 0, 1, sign)
    scale = scale.to(s.dtype)
    scale_sign = torch.where(scale < 0, -1, 1).to(s.dtype)
    sig = scale.abs()[:, None] * s
    tol = sig[:, :1] * max(A.shape[2], B.shape[1]) * torch.finfo(torch.float32).eps
    root = torch.where(sig > tol, sig.clamp(min=0).sqrt(), 0)[:, None, :]
    fu = u * sign * root
    fv = v * sign * scale_sign[:, None, None] * root
    per = torch.cat([_column_stats(fu), _column_stats(fv)], dim=2)  # (n, k, 10)
    out = per.flatten(1)
    return _finish([_pad_cols(out, params.width())])


# ----------------------------------------------------------------------------------------------
# Registration: one explicit call each, in the order `--rep all` computes them

_NONE = NoParams()
register(Representation("simple_stats", 1, "tensor", 5, "none", _NONE, simple_stats, features=SIMPLE_STATS))
register(Representation("rank_based", 1, "tensor", 11, "none", _NONE, rank_based, features=RANK_BASED))
register(Representation("stats", 1, "tensor", 7, "none", _NONE, stats, features=STATS))
register(Representation("spectral", 1, "tensor", 32, "none", _NONE, spectral, features=SPECTRAL))
register(Representation("matrix_norms", 1, "tensor", 7, "none", _NONE, matrix_norms, features=MATRIX_NORMS))
register(Representation("distribution", 1, "tensor", 12, "none", _NONE, distribution, features=DISTRIBUTION))
register(Representation("frequency", 1, "tensor", 14, "none", _NONE, frequency, features=FREQUENCY))
register(Representation("info_theoretic", 1, "tensor", 2, "none", _NONE, info_theoretic, features=INFO_THEORETIC))
register(Representation("ensemble", 1, "tensor", 67, "none", _NONE, ensemble, features=ENSEMBLE))
register(Representation("dw_spectrum", 1, "module", 8, GL_INVARIANT, SpectrumParams(), dw_spectrum))  # names: s0..s{k-1}
register(Representation("dw_norms", 1, "module", 5, GL_INVARIANT, _NONE, dw_norms, features=DW_NORMS))
register(Representation("dw_stats", 2, "module", 4, GL_INVARIANT, _NONE, dw_stats, features=DW_STATS))
register(Representation("dw_probe", 1, "module", 16, GL_INVARIANT, ProbeParams(), dw_probe))  # probe0..probe{count-1}
register(Representation("dw_canonical", 1, "module", 40, GL_INVARIANT + ", signs canonicalised", CanonicalParams(),
                        dw_canonical))  # u0_mean ... v{k-1}_deloc (CanonicalParams.feature_names)
register(Representation("dw_quantiles", 1, "module", 7, GL_INVARIANT, _NONE, dw_quantiles, opt_in=True,
                        features=DW_QUANTILE_NAMES))
