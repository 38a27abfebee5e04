"""The training step of pipeline/model.py: no host reads, an operator count independent of the runs and
their learning rates, torch.compile, the dropout masks of pipeline/masks.py, and bit-for-bit runs whatever
the ensemble (on the CPU). CUDA-only checks are marked and say why they skip."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline import masks, model
from pipeline.model import Hyper, train_ensemble
from reference import original_run

NO_CUDA = "SKIPPED, NOT RUN: needs a CUDA GPU and torch.cuda.is_available() is False here; run `pytest -m cuda` on a GPU machine"


def toy(n=150, d=20, classes=4, seed=0, signal=2.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + signal * torch.nn.functional.one_hot(y, d).float()
    return x, y


def net_for(runs: int, hp: Hyper, d=20, classes=4, task="classification", traced=False, lrs=1, device="cpu"):
    """A fresh ensemble of ``runs`` runs, with ``lrs`` distinct learning rates among them."""
    net, plan, gens, _ = model._start(list(range(runs)), d, classes, hp, task, device, traced=traced)
    net.set_lrs(plan, np.array(plan.levels)[np.arange(runs) % lrs])
    return net, plan, gens


def batch(runs: int, rows: int, n=150, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:rows] for _ in range(runs)])


def assert_same_runs(ens, r, alone, k=0):
    """Run r of ensemble ``ens`` and run k of ``alone``: every curve, best epoch and weight bit for bit."""
    assert ens.best_epoch[r] == alone.best_epoch[k]
    for name, curves in ens.curves.items():
        np.testing.assert_array_equal(curves[r], alone.curves[name][k], err_msg=name)
    for which in ("best", "last"):
        for key, value in getattr(ens, which).items():
            assert torch.equal(value[r], getattr(alone, which)[key][k]), (which, key)


# --- host reads --------------------------------------------------------------------------------------


class HostReads(TorchFunctionMode):
    """Records every call that reads a tensor's values into Python or builds a tensor from Python data: on
    CUDA each is a host synchronisation (or a blocking copy)."""

    READS = {"item", "cpu", "numpy", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__",
             "__array__", "tensor", "as_tensor", "from_numpy"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        to_host = name == "to" and any(str(a).startswith("cpu") for a in (*args[1:], *kwargs.values()))
        if name in self.READS or to_host:
            self.calls.append(name)
        return func(*args, **kwargs)


def test_the_host_read_counter_catches_each_kind_of_read():
    t = torch.ones(3)
    reads = [lambda: t.sum().item(), lambda: t.cpu(), lambda: t.numpy(), lambda: bool(t[0]), lambda: t.tolist(),
             lambda: torch.tensor(1.0), lambda: torch.as_tensor([2.0]), lambda: float(t[0]), lambda: int(t[0]),
             lambda: t.to("cpu"), lambda: np.asarray(t)]
    for read in reads:
        with HostReads() as counter:
            read()
        assert len(counter.calls) >= 1, counter.calls
    with HostReads() as counter:
        (t * 2 + 1).sum(0)
    assert counter.calls == []


@pytest.mark.parametrize("task, dropout", [("classification", 0.5), ("regression", 0.0)])
def test_an_epochs_steps_read_nothing_back_to_the_host(task, dropout):
    """Every step of an epoch, the last smaller batch included: no host read (on CUDA: no synchronisation)."""
    x, y = toy(70)
    y = y if task == "classification" else y.float()
    hp = Hyper(hidden=16, depth=2, batch_size=32, dropout=dropout)
    net, plan, gens = net_for(3, hp, classes=4 if task == "classification" else 1, task=task, lrs=3)
    order = model._epoch_orders(gens, net, net.members, len(x))
    steps = model._Steps(net, plan, x, y, hp.batch_size, graphs=False)
    with HostReads() as counter:
        seen = model._train_epoch(steps, order, hp.batch_size)
    assert seen == 70 and int(net.step) == 3
    assert counter.calls == []


# --- the operators of a step -------------------------------------------------------------------------


VIEWS = {"aten::view", "aten::as_strided", "aten::slice", "aten::narrow", "aten::alias", "aten::transpose",
         "aten::unsqueeze", "aten::select", "aten::expand", "aten::detach", "detach", "aten::_reshape_alias"}
# inside aten::_fused_adam_ on the CPU: each tensor of its lists reads its step count (a CPU scalar) on the host;
# the lists hold a row per run and weight, and on CUDA the kernel reads the counts on the device
FUSED_ADAM_READS = {"aten::item", "aten::_local_scalar_dense"}


def operators(runs: int, lrs: int, rows: int = 32, hidden: int = 16) -> tuple[Counter, Counter]:
    """The operators one step runs (as torch.profiler records them): the top-level ones, and every one inside
    them but views (a view computes nothing: aten::cat takes a narrow view of its output per input unless all
    are contiguous, which one run's batch is and ten runs' are not) and the fused kernel's step reads."""
    from torch.profiler import ProfilerActivity, profile

    x, y = toy()
    hp = Hyper(hidden=hidden, depth=2, batch_size=32, dropout=0.5)
    net, plan, _ = net_for(runs, hp, lrs=lrs)
    idx = batch(runs, rows)
    model.train_step(net, idx, x, y, plan)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.train_step(net, idx, x, y, plan)
    events = prof.events()
    inner = Counter(e.name for e in events if e.name not in VIEWS | FUSED_ADAM_READS)
    return Counter(e.name for e in events if e.cpu_parent is None), inner


@pytest.mark.parametrize("rows, hidden", [(32, 16), (2, 24)])  # a full batch; a last batch of two, an odd width
def test_a_step_runs_the_same_operators_whatever_the_runs_and_learning_rates(rows, hidden):
    one = operators(1, 1, rows, hidden)
    assert sum(one[0].values()) > 50  # else the profiler recorded nothing
    for runs, lrs in ((10, 1), (10, 10)):
        assert operators(runs, lrs, rows, hidden) == one, (runs, lrs)


# --- torch.compile -----------------------------------------------------------------------------------


def assert_close_training(a, b, plan, hp, steps, rtol, atol):
    """Two ensembles that took the same steps agree to float rounding. Not the hidden layers' biases (the last
    row of w0, w1, ...) and the BatchNorm running means that follow them: BatchNorm cancels a bias before it,
    so its true gradient is 0 and its computed one rounding noise, which Adam turns into steps of up to lr
    in any direction; only their bound, 2 lr per step, is checked."""
    torch.testing.assert_close(a.sums, b.sums, rtol=rtol, atol=atol)
    sa, sb = a.state(plan), b.state(plan)
    for key in sa:
        x, y = sa[key], sb[key]
        if key.startswith("mean") or (key.startswith("w") and int(key[1:]) < hp.depth):
            assert (x - y).abs().max() <= 2 * hp.lr * steps, key
            x, y = (x[:, :-1], y[:, :-1]) if key.startswith("w") else (x[:0], y[:0])
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=key)


def test_the_step_compiles_whole_and_matches_eager():
    """torch.compile(train_step, fullgraph=True) on the CPU, with backend aot_eager: dynamo and AOT autograd's
    functionalisation trace the whole step (inductor would then build C++, minutes on a small CPU). Its
    numbers are eager's to float rounding, and so are those of the eager default (autograd.grad, fused Adam)."""
    x, y = toy()
    hp = Hyper(hidden=16, depth=2, batch_size=32, dropout=0.5, lr=1e-2)
    eager, plan, _ = net_for(3, hp, traced=True, lrs=2)
    compiled = eager.clone(plan)
    fused, fused_plan, _ = net_for(3, hp, lrs=2)
    step = torch.compile(model.train_step, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    try:
        for s in range(3):
            idx = batch(3, 32, seed=s)
            model.train_step(eager, idx, x, y, plan)
            step(compiled, idx, x, y, plan)
            model.train_step(fused, idx, x, y, fused_plan)
    finally:
        torch._dynamo.reset()
    assert int(compiled.step) == 3 and int(eager.step) == 3
    assert_close_training(compiled, eager, plan, hp, 3, rtol=1e-5, atol=1e-6)
    assert_close_training(fused, eager, plan, hp, 3, rtol=1e-5, atol=1e-6)


# --- the dropout hash and its masks ------------------------------------------------------------------


def _numpy_lowbias32(x: np.ndarray, outer: bool = True) -> np.ndarray:
    x = x.astype(np.uint32)
    if outer:
        x ^= x >> np.uint32(16)
    x = x * np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x = x * np.uint32(0x846CA68B)
    if outer:
        x ^= x >> np.uint32(16)
    return x


def test_the_hash_is_lowbias32_in_uint32_arithmetic():
    values = np.random.default_rng(0).integers(-2 ** 31, 2 ** 31, 100_000, dtype=np.int64).astype(np.int32)
    values[:4] = [0, -1, 2 ** 31 - 1, -2 ** 31]
    x = torch.from_numpy(values)
    np.testing.assert_array_equal(masks.mix32(x).numpy().view(np.uint32), _numpy_lowbias32(values.view(np.uint32)))
    np.testing.assert_array_equal(masks.cell_hash(x).numpy().view(np.uint32),
                                  _numpy_lowbias32(values.view(np.uint32), outer=False))
    assert masks.keys([0, 1, 2 ** 62]) == masks.keys([0, 1, 2 ** 62])
    assert len(set(masks.keys(list(range(1000))))) == 1000


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_masks_keep_each_unit_with_probability_one_minus_p(p):
    """Over 3 layers x 40 steps x 3 runs x 64 x 128 units: the kept fraction within 5 standard errors of 1 - p,
    values exactly 0 or 1 / (1 - p); and no correlation (within 5 standard errors of 0) between neighbouring
    units, rows, layers, steps and runs, the structures a counter-based hash could leak."""
    keys = torch.tensor(masks.keys([7, 8, 9]), dtype=torch.int32)
    drawn = torch.stack([torch.stack(masks.noise(keys, torch.tensor(s), 3, 64, 128, p))
                         for s in range(1, 41)])  # (step, layer, run, rows, width)
    values = torch.unique(drawn)
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / (1 - p)]), rtol=0, atol=0)
    kept = (drawn > 0).double()
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    z = (kept - (1 - p)) / (p * (1 - p)) ** 0.5

    def corr(a, b):
        return (a * b).mean().item()

    pairs = {"units": (z[..., 1:], z[..., :-1]), "rows": (z[..., 1:, :], z[..., :-1, :]),
             "runs": (z[:, :, 1:], z[:, :, :-1]), "layers": (z[:, 1:], z[:, :-1]), "steps": (z[1:], z[:-1])}
    for name, (a, b) in pairs.items():
        assert abs(corr(a, b)) < 5 / a.numel() ** 0.5, name


def test_a_runs_masks_depend_only_on_its_seed_step_and_layer():
    seeds = [3, 11, 42, 2 ** 40]
    keys = torch.tensor(masks.keys(seeds), dtype=torch.int32)
    together = masks.noise(keys, torch.tensor(17), 2, 5, 24, 0.3)
    for r, seed in enumerate(seeds):
        for layer in range(2):
            assert torch.equal(together[layer][r], masks.mask(seed, 17, layer, 2, 5, 24, 0.3))
    assert not torch.equal(masks.mask(3, 17, 0, 2, 5, 24, 0.3), masks.mask(3, 18, 0, 2, 5, 24, 0.3))
    assert not torch.equal(masks.mask(3, 17, 0, 2, 5, 24, 0.3), masks.mask(3, 17, 1, 2, 5, 24, 0.3))


# --- runs, bit for bit, whatever the ensemble ---------------------------------------------------------


@pytest.mark.parametrize("masked, hidden", [(False, 24), (True, 16)], ids=["compacted", "masked"])
def test_a_run_trained_alone_is_the_run_trained_among_ten(masked, hidden, monkeypatch):
    """On the CPU, exactly. Dropout 0.5, learning rates lowered at different epochs, early stopping at different
    epochs (stopped runs compacted away at once, or masked: rate 0, shapes kept, until half have stopped, as
    with CUDA graphs), a last batch of two rows
    (fewer than torch's threads on most machines: BatchNorm's other layout), and a width that is no multiple of
    16 (that layout again) or one that is."""
    if masked:
        monkeypatch.setattr(model, "_compact_now", lambda active, members, graphs: 0 < active <= members // 2)
    x, y = toy(130, seed=3)
    xv, yv = toy(30, seed=4)
    seeds = list(range(20, 30))
    hp = Hyper(hidden=hidden, depth=2, epochs=10, patience=3, plateau_patience=1, batch_size=32, lr=1e-2)
    together = train_ensemble(x, y, xv, yv, seeds, hp, "classification", 4)
    assert len({len(c) for c in together.curves["lr"]}) > 2  # runs stopped at different epochs
    for r in (0, 9):
        assert_same_runs(together, r, train_ensemble(x, y, xv, yv, [seeds[r]], hp, "classification", 4))


def test_a_regression_run_alone_is_the_run_among_three():
    x, y = toy(100, seed=5)
    y = y.float() + 0.3 * x[:, 0]
    xv, yv = toy(30, seed=6)
    yv = yv.float() + 0.3 * xv[:, 0]
    hp = Hyper(hidden=16, depth=1, epochs=6, patience=3, batch_size=32, lr=1e-2)
    together = train_ensemble(x, y, xv, yv, [1, 2, 3], hp, "regression", 1)
    assert together.best[f"w{hp.depth}"].shape == (3, 17, 1)
    assert_same_runs(together, 1, train_ensemble(x, y, xv, yv, [2], hp, "regression", 1))


@pytest.mark.parametrize("dense", [False, True], ids=["per-level", "dense"])
def test_a_masked_run_keeps_its_weights_and_changes_no_other_run(dense):
    x, y = toy()
    hp = Hyper(hidden=16, depth=2, batch_size=32, dropout=0.5)
    (net, plan), (alone, _) = [model._start(list(range(4)), 20, 4, hp, "classification", "cpu", graphs=dense)[:2]
                               for _ in range(2)]
    net.set_lrs(plan, np.array([plan.lr, 0.0, plan.lr, plan.lr]))
    before = net.state(plan)["w1"][1].clone()
    for s in range(3):
        idx = batch(4, 32, seed=s)
        model.train_step(net, idx, x, y, plan)
        model.train_step(alone, idx, x, y, plan)
    assert torch.equal(net.state(plan)["w1"][1], before)
    for key, value in net.state(plan).items():
        for r in (0, 2, 3):
            assert torch.equal(value[r], alone.state(plan)[key][r]), key


def test_the_dense_adam_of_cuda_graphs_agrees_with_the_per_level_one():
    """CUDA graphs need fixed shapes, so their Adam (_Plan.dense) steps every block whole with the initial
    learning rate and lerps each run by its rate: bit for bit the per-level kernel calls at rate 1 (and a
    stopped run's weights), the same to float rounding at rates 0.5 and 0.25. Here on the CPU."""
    x, y = toy()
    hp = Hyper(hidden=16, depth=2, batch_size=32, dropout=0.5, lr=1e-2)
    states, sums = [], []
    for dense in (False, True):
        net, plan, _, _ = model._start(list(range(5)), 20, 4, hp, "classification", "cpu", graphs=dense)
        assert plan.dense is dense
        net.set_lrs(plan, np.array([1.0, 0.5, 0.0, 1.0, 0.25]) * plan.lr)
        for s in range(3):
            model.train_step(net, batch(5, 32, seed=s), x, y, plan)
        states.append(net.state(plan))
        sums.append(net.sums)
    levels, dense = states
    torch.testing.assert_close(sums[0], sums[1], rtol=1e-5, atol=1e-6)
    for key in levels:
        for r in (0, 2, 3):
            assert torch.equal(levels[key][r], dense[key][r]), (key, r)
        for r in (1, 4):
            a, b = levels[key][r], dense[key][r]
            if key.startswith("w") and int(key[1:]) < hp.depth:  # a hidden layer's bias: see assert_close_training
                assert (a[-1] - b[-1]).abs().max() <= 2 * hp.lr * 3
                a, b = a[:-1], b[:-1]
            if not key.startswith("mean"):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


def test_with_dropout_each_run_is_the_reference_loop_with_the_same_masks():
    """The original loop (tests/reference.py) with its nn.Dropout draws replaced by masks.mask: as strict as
    the dropout-0 test of tests/test_train.py (train losses within 1e-5, validation accuracies, learning rates
    and best epochs equal), through early stopping at different epochs and the compaction that follows."""
    x, y = toy()
    xv, yv = toy(40, seed=1)
    hp = Hyper(hidden=32, epochs=25, patience=6, plateau_patience=1, batch_size=32, lr=1e-2, dropout=0.5)
    seeds = [42, 43, 44]
    ens = train_ensemble(x, y, xv, yv, seeds, hp, "classification", 4)
    assert len({len(c) for c in ens.curves["lr"]}) > 1 and len(set(np.concatenate(ens.curves["lr"]))) > 1
    for r, seed in enumerate(seeds):
        def given(step, layer, rows, width, seed=seed):
            return masks.mask(seed, step, layer, hp.depth, rows, width, hp.dropout)

        ref = original_run(x, y, xv, yv, xv, yv, seed, hp, 4, dropout_masks=given)
        if r == 0:  # the masks the reference took are the ones the ensemble drew for that run
            keys = torch.tensor(masks.keys(seeds), dtype=torch.int32)
            assert torch.equal(masks.noise(keys, torch.tensor(5), hp.depth, 32, 32, 0.5)[1][0], given(5, 1, 32, 32))
        assert ens.best_epoch[r] == ref["best_epoch"]
        np.testing.assert_allclose(ens.curves["train_loss"][r], ref["curves"]["train_loss"], atol=1e-5)
        np.testing.assert_array_equal(ens.curves["val_score"][r], ref["curves"]["val_score"])
        np.testing.assert_array_equal(ens.curves["lr"][r], ref["curves"]["lr"])
        assert ens.curves["val_score"][r].max() > 0.6  # it learned: no near-ties for rounding to flip


# --- timing, and CUDA ---------------------------------------------------------------------------------


def test_time_steps_times_the_real_step():
    x, y = toy(200)
    out = model.time_steps(x, y, [0, 1], Hyper(hidden=16, depth=2), "classification", 4, steps=3, warmup=1)
    assert out["runs"] == 2 and out["device"] == "cpu" and out["steps"] == 3 and out["graphs"] is False
    assert out["ms_per_step"] > 0 and out["host_syncs"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_graph_steps_equal_eager_steps_and_sync_nothing():
    """The CUDA graph replays what the eager steps compute (to float rounding: cuBLAS may choose other kernels in
    a capture), and time_steps's steps make no host synchronisation (sync debug mode "error" raises on one)."""
    x, y = (t.cuda() for t in toy(300))
    hp = Hyper(hidden=64, depth=2, batch_size=32, dropout=0.5, epochs=4, patience=10)
    graphed = train_ensemble(x, y, x[:60], y[:60], [0, 1, 2], hp, "classification", 4, graphs=True)
    eager = train_ensemble(x, y, x[:60], y[:60], [0, 1, 2], hp, "classification", 4, graphs=False)
    for name in ("train_loss", "val_loss"):  # (not the weights: see assert_close_training on the hidden biases)
        for a, b in zip(graphed.curves[name], eager.curves[name]):
            np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=name)
    timing = model.time_steps(x, y, list(range(10)), hp, "classification", 4, steps=20)
    assert timing["graphs"] is True and timing["host_syncs"] == 0
