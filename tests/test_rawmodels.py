"""The models that learn from the raw factors (``--model glnet``, ``--model probe``) and their loop
(pipeline/rawtrain.py): GL(r) invariance, dW never formed, AdamW as torch's, runs independent, learning above
chance, the raw bytes read per epoch resident and streamed, and the configurations in report and info."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
import zarr
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import pipeline
from conftest import assert_one_line_error, materialize_to, run_cli, save_matrix_dataset
from pipeline import commands, glnet, models, probe, rawdata, rawtrain, report, store as store_mod
from pipeline.hyper import Hyper
from pipeline.info import summary as info_summary
from pipeline.rawdata import RawFactors
from pipeline.train import TrainConfig, train

NETS = {"glnet": glnet, "probe": probe}
# module name -> (rank, in, out): two modules, one per layer set (visual = attn1, text = attn2)
MODULES = {"unet.blk.attn1.to_q": (2, 6, 5), "unet.blk.attn2.to_q": (2, 4, 7)}
CLASSES = 3
CHUNK_ROWS = 8  # rows per stored chunk of the factor store: several chunks per split


@pytest.fixture(autouse=True)
def small_models(monkeypatch):
    """The same networks at test size: probe's 32 x 32 probes and glnet's head of 128 cost seconds per epoch on a
    loaded 2-core machine, and nothing tested here depends on their sizes."""
    monkeypatch.setattr(probe, "PROBES", 4)
    monkeypatch.setattr(probe, "PROJECTION", 3)
    monkeypatch.setattr(glnet, "HEAD", 16)


def planted(n: int, seed: int) -> tuple[dict[str, list[np.ndarray]], np.ndarray, np.ndarray]:
    """``n`` adapters of CLASSES classes whose class is in dW = B A (a fixed U_c V_c per class and module, plus noise)
    while each adapter's factors are scrambled by its own random G (B G^-1, G A): only what depends on dW shows the
    class. Returns the dataset columns (down: A, up: B), the class codes and a float score (||dW||_F + noise)."""
    world = np.random.default_rng(1234)
    rng = np.random.default_rng(seed)
    label = rng.integers(0, CLASSES, n)
    columns = {}
    for name, (r, fan_in, fan_out) in MODULES.items():
        u, v = world.standard_normal((CLASSES, fan_out, r)), world.standard_normal((CLASSES, r, fan_in))
        b = u[label] + 0.4 * rng.standard_normal((n, fan_out, r))
        a = v[label] + 0.4 * rng.standard_normal((n, r, fan_in))
        g = rng.standard_normal((n, r, r)) + 2 * np.eye(r)
        b, a = b @ np.linalg.inv(g), g @ a
        columns[f"{name}.lora.down.weight"] = list(a.astype(np.float32))
        columns[f"{name}.lora.up.weight"] = list(b.astype(np.float32))
    return columns, label, label + 0.2 * rng.standard_normal(n)


@pytest.fixture(scope="module")
def factor_store(tmp_path_factory):
    """120 planted adapters (84 train / 12 val / 24 test) stored in chunks of CHUNK_ROWS rows, a class label
    ``label`` and a float label ``score``; treat as read-only (copy it to train into it)."""
    home = tmp_path_factory.mktemp("factors")
    columns, label, score = planted(120, seed=0)
    names = np.array(["a", "b", "c"])[label].tolist()
    source = save_matrix_dataset(home / "src", columns, extra={"label": names, "score": score.tolist()},
                                 extra_features={"label": datasets.Value("string"), "score": datasets.Value("float64")})
    path = home / "factors.zarr"
    widest = max(4 * r * max(fan_in, fan_out) for r, fan_in, fan_out in MODULES.values())
    materialize_to(path, source, chunk_mb=CHUNK_ROWS * widest / 2**20)
    return path


def _copy(factor_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(factor_store, path)
    return path


def toy_factors(n: int = 12, seed: int = 0, dtype=torch.float32) -> RawFactors:
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(n, r, i, generator=g, dtype=dtype) for r, i, _ in MODULES.values()]
    B = [torch.randn(n, o, r, generator=g, dtype=dtype) for r, _, o in MODULES.values()]
    scale = [torch.rand(n, generator=g, dtype=dtype) + 0.5, torch.full((n,), -0.7, dtype=dtype)]  # a negative s too
    return RawFactors(list(MODULES), A, B, scale)


def change_basis(x: RawFactors, seed: int = 1, invariant: bool = True) -> RawFactors:
    """(B G^-1, G A) with a random well-conditioned G per adapter and module (singular values in [0.5, 2]); not
    ``invariant``: B G^-1 with A kept, a change that moves dW (the test's own check that it can fail)."""
    g = torch.Generator().manual_seed(seed)
    A, B = [], []
    for a, b in zip(x.A, x.B):
        n, r = a.shape[0], a.shape[1]
        q1, _ = torch.linalg.qr(torch.randn(n, r, r, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(n, r, r, generator=g, dtype=torch.float64))
        G = q1 @ torch.diag_embed(0.5 + 1.5 * torch.rand(n, r, generator=g, dtype=torch.float64)) @ q2
        A.append((G @ a.double()).to(a.dtype) if invariant else a)
        B.append((b.double() @ torch.linalg.inv(G)).to(b.dtype))
    return RawFactors(x.modules, A, B, x.scale)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- invariance, and dW never formed ------------------------------------------------------------------


@pytest.mark.parametrize("name", NETS)
def test_outputs_are_invariant_to_a_change_of_basis_of_every_module_float64(name):
    """The network as a pure function, in float64, with random weights and depth 2 (glnet: a GL nonlinearity)."""
    net = NETS[name].NET
    hp = Hyper(depth=2, hidden=6)
    x = toy_factors(dtype=torch.float64)
    params = {k: v.double() for k, v in net.init([torch.Generator().manual_seed(s) for s in (0, 1)], rawtrain.shapes_of(x),
                                                   hp, CLASSES).items()}

    def outputs(f):
        consts = {k: v.double() for k, v in net.prepare(iter([f])).items()} if net.prepare else {}
        return net.forward(params, rawtrain._lead(f), consts, hp)

    base = outputs(x)
    assert base.shape == (2, len(x), CLASSES) and base.abs().max() > 1e-3
    assert _relative(outputs(change_basis(x)), base) < 1e-10
    assert _relative(outputs(change_basis(x, invariant=False)), base) > 1e-2  # the check can fail


@pytest.mark.parametrize("name", NETS)
def test_a_trained_model_is_invariant_to_a_change_of_basis_float32(name):
    """End to end, as trained (float32): the fitted runs' predictions move by less than 1e-4 (relative)."""
    x, y = toy_factors(40), torch.arange(40) % CLASSES
    hp = dataclasses.replace(models.get(name).hyper(models.get(name).unset()), depth=2, hidden=6, epochs=2, batch_size=8)
    fitted = NETS[name].fit((x, y), (x, y), [0, 1], hp, "classification", CLASSES)
    for which in ("best", "last"):
        base = fitted.predict(x, which)
        assert _relative(fitted.predict(change_basis(x), which), base) < 1e-4
        assert _relative(fitted.predict(change_basis(x, invariant=False), which), base) > 1e-2


class _Shapes(TorchDispatchMode):
    """Every tensor an op produces (forward and backward), by shape."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("name", NETS)
def test_dw_is_never_formed(name):
    """No tensor of a forward and backward step has an (out, in) or (in, out) pair of dims, or as many numbers as
    the batch's dW would (runs x batch x out x in): with in = 48, out = 80 and every other size small, any product
    B A, or a flattened one, would show."""
    fan_in, fan_out, rank, runs, batch = 48, 80, 2, 2, 3
    g = torch.Generator().manual_seed(0)
    x = RawFactors(["m"], [torch.randn(runs, batch, rank, fan_in, generator=g)],
                   [torch.randn(runs, batch, fan_out, rank, generator=g)], [torch.ones(runs, batch)])
    net, hp = NETS[name].NET, Hyper(depth=2, hidden=4)
    params = {k: v.requires_grad_() for k, v in net.init([g, g], [(rank, fan_in, fan_out)], hp, CLASSES).items()}
    consts = {"rms": torch.ones(1)} if net.prepare else {}
    with _Shapes() as seen:
        out = net.forward(params, x, consts, hp)
        torch.autograd.grad(out.square().sum(), list(params.values()))
    assert seen.shapes, "nothing was recorded"
    assert not [s for s in seen.shapes if {fan_in, fan_out} <= set(s[-2:])]
    assert max(int(np.prod(s)) for s in seen.shapes) < runs * batch * fan_in * fan_out / 4


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("name", NETS)
def test_forward_flops_are_the_matmul_flops_torch_counts(name, depth):
    """What ``train --dry-run`` estimates a raw model's cost from (its ``forward_flops``) is what torch's
    FlopCounterMode counts in a forward pass of one run on one adapter (matmuls only; the elementwise rest is left
    out of every model's estimate)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = toy_factors(1)
    net, hp = NETS[name].NET, Hyper(depth=depth, hidden=6)
    params = net.init([torch.Generator().manual_seed(0)], rawtrain.shapes_of(x), hp, CLASSES)
    consts = net.prepare(iter([x])) if net.prepare else {}
    with FlopCounterMode(display=False) as counter:
        net.forward(params, rawtrain._lead(x), consts, hp)
    counted = counter.get_total_flops()
    estimated = NETS[name].forward_flops(rawtrain.shapes_of(x), dataclasses.asdict(hp), CLASSES)
    assert counted > 0 and estimated == counted


# --- the loop --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [[1e-2, 3e-3, 1e-2], [3e-3, 3e-3, 3e-3]], ids=["own-rates", "one-rate"])
def test_adamw_step_is_torch_adamw(lr):
    """Three runs with their own learning rates (two groups) or one, five steps: the same parameters as
    torch.optim.AdamW on each run."""
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(3, 3, 4, generator=g), "b": torch.randn(3, 4, generator=g)}
    grads = [[torch.randn(3, 3, 4, generator=g), torch.randn(3, 4, generator=g)] for _ in range(5)]
    lr, decay = np.array(lr), 0.1
    params = {k: v.clone() for k, v in start.items()}
    adam = rawtrain.AdamW.of(params)
    for step in grads:
        rawtrain.adamw_step(params, step, adam, lr, decay)
    for r in range(3):
        mine = [start[k][r].clone().requires_grad_() for k in ("w", "b")]
        opt = torch.optim.AdamW(mine, lr=float(lr[r]), weight_decay=decay)
        for step in grads:
            for p, grad in zip(mine, step):
                p.grad = grad[r].clone()
            opt.step()
        for k, p in zip(("w", "b"), mine):
            torch.testing.assert_close(params[k][r], p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NETS)
def test_runs_trained_together_are_the_runs_trained_alone(name):
    """Each run has its own initialisation and shuffling: R = 2 at once gives run by run what R = 1 gives."""
    x, y = toy_factors(30), torch.arange(30) % CLASSES
    xv, yv = toy_factors(9, seed=5), torch.arange(9) % CLASSES
    hp = Hyper(depth=1, hidden=6, epochs=3, patience=3, batch_size=8, lr=1e-2, weight_decay=0.0)
    together = NETS[name].fit((x, y), (xv, yv), [3, 4], hp, "classification", CLASSES)
    for r, seed in enumerate((3, 4)):
        alone = NETS[name].fit((x, y), (xv, yv), [seed], hp, "classification", CLASSES)
        for curve in ("train_loss", "val_loss"):
            np.testing.assert_allclose(together.curves[curve][r], alone.curves[curve][0], rtol=1e-4)
        torch.testing.assert_close(together.predict(xv, "best")[r], alone.predict(xv, "best")[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NETS)
def test_a_batch_too_large_for_memory_goes_through_in_parts_with_the_same_step(name, monkeypatch):
    """With a step budget of a few rows' activations, each batch of 8 goes through in parts of 3, 3 and 2, their
    gradients summed: the same runs (curves and predictions) as whole batches, up to float rounding."""
    x, y = toy_factors(30), torch.arange(30) % CLASSES
    xv, yv = toy_factors(9, seed=5), torch.arange(9) % CLASSES
    hp = Hyper(depth=2, hidden=6, epochs=3, patience=3, batch_size=8, lr=1e-2, weight_decay=0.0)
    whole = NETS[name].fit((x, y), (xv, yv), [3, 4], hp, "classification", CLASSES)
    per_row = NETS[name].NET.row_elements(rawtrain.shapes_of(x), hp)
    monkeypatch.setattr(rawtrain, "_STEP_ELEMENTS", 2 * 3 * per_row)  # 2 runs x 3 rows
    parts = []
    forward = NETS[name].NET.forward
    monkeypatch.setattr(NETS[name], "NET", dataclasses.replace(
        NETS[name].NET, forward=lambda p, f, c, h: parts.append(f.A[0].shape[1]) or forward(p, f, c, h)))
    split = NETS[name].fit((x, y), (xv, yv), [3, 4], hp, "classification", CLASSES)
    assert parts[:4] == [3, 3, 2, 3]  # the first batches of the first epoch, in parts (30 rows: 8, 8, 8, 6)
    for curve in ("train_loss", "train_score", "val_loss", "val_score"):
        np.testing.assert_allclose(split.curves[curve][0], whole.curves[curve][0], rtol=1e-5)
        np.testing.assert_allclose(split.curves[curve][1], whole.curves[curve][1], rtol=1e-5)
    torch.testing.assert_close(split.predict(xv, "best"), whole.predict(xv, "best"), rtol=1e-4, atol=1e-5)


# --- on a store: learning, the bytes read, report and info ------------------------------------------------


QUICK = {"glnet": dict(hidden=6, batch_size=16, epochs=8, patience=4), "probe": dict(hidden=16, lr=3e-3, epochs=8, patience=4)}


@pytest.mark.parametrize("name", NETS)
def test_a_raw_model_learns_the_class_and_a_float_label(factor_store, tmp_path, name):
    """Above chance (1/3) on the planted classes, which only dW shows (each adapter's factors are scrambled by a
    G of its own), and R^2 > 0.5 on a float label; written as the MLP's runs are."""
    path = _copy(factor_store, tmp_path)
    (klass,) = train(TrainConfig(store=str(path), model=name, label="label", runs=2, quiet=True, **QUICK[name])).results
    assert klass.setup.reps == (models.RAW,) and klass.score == "accuracy" and klass.test_score > 0.6
    (value,) = train(TrainConfig(store=str(path), model=name, label="score", runs=2, quiet=True, **QUICK[name])).results
    assert value.score == "r2" and value.test_score > 0.5
    runs = pipeline.load_runs(str(path))
    assert len(runs) == 4 and set(runs["model"]) == {name}
    predictions = pipeline.load_predictions(str(path), config=klass.config_hash)
    assert len(predictions) == 2 * 25
    root = zarr.open_group(str(path), mode="r")
    run = root[f"runs/{klass.config_hash}/run-000"]
    assert run["val_score"].shape == (run.attrs["epochs"],) and np.isfinite(run["train_loss"][:]).all()


READS: list = []


def counting_fit(train_split, val_split, seeds, hp, task, n_out, on_epoch=None):
    """The real fit of the model in ``READS[0]``, noting how many raw reads had happened at each epoch's end."""
    name, marks = READS[0], READS[1]
    marks.append(("start", len(READS) - 2, type(train_split[0]).__name__, type(val_split[0]).__name__))
    return NETS[name].fit(train_split, val_split, seeds, hp, task, n_out,
                          lambda epoch, active: marks.append((epoch, len(READS) - 2)))


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_raw_bytes_read_per_epoch(factor_store, tmp_path, monkeypatch, name, mode):
    """Resident: every split's raw arrays read once, before training, nothing during it. Streamed (a memory budget
    smaller than any split): each epoch reads every chunk of train and val exactly once (train's in another
    order each epoch), so its bytes are the arrays' bytes; glnet also reads train once for its scale before."""
    path = _copy(factor_store, tmp_path)
    original = store_mod.read

    def read(array, start=None, stop=None, group=None):
        values = original(array, start, stop, group)
        if array.path.startswith("raw/"):
            READS.append((array.path, start, values.nbytes))
        return values

    READS[:] = [name, []]
    monkeypatch.setattr(store_mod, "read", read)
    monkeypatch.setitem(models.REGISTRY, name, dataclasses.replace(models.get(name), fit=f"{__name__}:counting_fit"))
    budget = None if mode == "resident" else 1500  # bytes: a split's factors take 2,000 (val) to 15,500 (train)
    train(TrainConfig(store=str(path), model=name, label="label", runs=2, epochs=3, patience=3, quiet=True, raw_memory=budget,
                      **{k: v for k, v in QUICK[name].items() if k not in ("epochs", "patience")}))
    root = zarr.open_group(str(path), mode="r")
    array_bytes = {s: sum(root[f"raw/{s}/{m}/{a}"].nbytes for m in root[f"raw/{s}"].group_keys() for a in ("A", "B"))
                   for s in ("train", "val", "test")}
    start, *epochs = READS[1]
    reads = READS[2:]
    _, before, train_type, val_type = start
    bounds = [before] + [count for _, count in epochs]
    per_epoch = [reads[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    assert len(per_epoch) == 3
    if mode == "resident":
        assert (train_type, val_type) == ("RawFactors", "RawFactors")
        assert sum(b for _, _, b in reads[:before]) == sum(array_bytes.values())
        assert all(epoch == [] for epoch in per_epoch)
        return
    assert (train_type, val_type) == ("RawSource", "RawSource") and before == 0
    extra = array_bytes["train"] if name == "glnet" else 0  # glnet's scale: one pass over train before epoch 1
    assert [sum(b for _, _, b in epoch) for epoch in per_epoch] == [array_bytes["train"] + array_bytes["val"] + extra] + \
        [array_bytes["train"] + array_bytes["val"]] * 2
    for i, epoch in enumerate(per_epoch):
        counts = Counter((path, first) for path, first, _ in epoch)
        assert set(counts.values()) == ({1, 2} if i == 0 and extra else {1}), "a chunk read twice in one epoch"
    orders = [[first for path, first, _ in epoch if path.startswith("raw/train/") and path.endswith("/A")] for epoch in per_epoch]
    assert sorted(orders[1]) == sorted(orders[2]) and orders[1] != orders[2]  # block order shuffled per epoch


def test_a_streamed_split_predicts_as_the_resident_one(factor_store):
    """The same weights give the same outputs whether a split is streamed by block or resident."""
    root = store_mod.open_root(str(factor_store), mode="r")
    source = rawdata.RawSource(root, root.attrs["modules"], "train", np.arange(84)[::2], buffer_bytes=600)
    assert len(source.blocks()) > 3
    hp = Hyper(depth=2, hidden=6)
    for net in (glnet.NET, probe.NET):
        params = net.init([torch.Generator().manual_seed(0)] * 2, rawtrain.shapes_of(source), hp, CLASSES)
        consts = net.prepare(f for f, _ in rawtrain.buffers(source)) if net.prepare else {}
        resident = source.load()
        if net.prepare:
            for key, value in net.prepare(iter([resident])).items():
                torch.testing.assert_close(consts[key], value)
        torch.testing.assert_close(rawtrain.evaluate(net, params, source, consts, hp, CLASSES),
                                   rawtrain.evaluate(net, params, resident, consts, hp, CLASSES))


def test_place_keeps_what_fits_and_streams_the_rest(factor_store):
    root = store_mod.open_root(str(factor_store), mode="r")
    keep = {s: np.arange(root.attrs["splits"][s]["n"]) for s in ("train", "val", "test")}
    sources = {s: rawdata.RawSource(root, root.attrs["modules"], s, keep[s]) for s in keep}
    size = {s: sources[s].nbytes for s in sources}
    placed = rawdata.place(sources, "cpu", size["val"] + size["test"])
    assert isinstance(placed["val"], RawFactors) and isinstance(placed["test"], RawFactors)
    assert isinstance(placed["train"], rawdata.RawSource) and placed["train"].buffer_bytes == 0
    placed = rawdata.place(sources, "cpu", size["val"] + size["train"] + 10)
    assert isinstance(placed["train"], RawFactors) and placed["test"].buffer_bytes == 10
    for split, factors in rawdata.place(sources, "cpu", None).items():  # the default budget: a quarter of the RAM
        loaded = rawdata.load(root, root.attrs["modules"], split, keep[split])
        for a, b in zip(factors.A + factors.B + factors.scale, loaded.A + loaded.B + loaded.scale):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_each_model_has_its_own_defaults():
    """An option not given takes the model's default (its paper's); one given is kept, even Hyper's own value."""
    assert (TrainConfig(model="glnet").hyper().hidden, TrainConfig(model="glnet").hyper().batch_size) == (64, 8)
    assert TrainConfig(model="glnet", hidden=512).hyper().hidden == 512 and TrainConfig().hyper().hidden == 512
    assert TrainConfig(model="probe").hyper().lr == 3e-4 and TrainConfig(model="probe").hyper().dropout == 0.0
    # a copy for another model gets that model's defaults, not the first one's (bench/train.py makes its grid so)
    mlp = TrainConfig(epochs=7)
    glnet_copy = dataclasses.replace(mlp, model="glnet")
    assert (glnet_copy.hyper().hidden, glnet_copy.hyper().batch_size, glnet_copy.hyper().epochs) == (64, 8, 7)
    assert dataclasses.replace(glnet_copy, model="mlp").hyper() == mlp.hyper()
    assert models.get("glnet").defaults()["depth"] == 1 and "dropout" not in models.get("probe").options()
    conf = {"reps": [{"name": "raw"}], "layer_set": "all", "label": "label", "model": "glnet", "seed": 42,
            **dataclasses.asdict(TrainConfig(model="glnet", hidden=512).hyper())}
    command = commands.train_command("s.zarr", conf, 2)
    assert "--hidden 512" in command and "--batch-size" not in command and "--depth" not in command
    shown = run_cli("train", "--help").output
    assert "glnet:" in shown and "probe:" in shown and "--raw-memory" in shown
    assert_one_line_error(run_cli("train", "--model", "glnet", "--raw-memory", "lots"), "--raw-memory")


def test_report_and_info_show_a_raw_model_as_its_own_configuration(factor_store, tmp_path):
    path = _copy(factor_store, tmp_path)
    for model, hidden in (("glnet", 6), ("probe", 16)):
        train(TrainConfig(store=str(path), model=model, label="label", layers="all,visual", hidden=hidden, runs=2, epochs=2,
                          quiet=True))
    train(TrainConfig(store=str(path), model="glnet", label="label", hidden=5, lr=3e-3, runs=2, epochs=2, quiet=True))
    summary = report.write_report(str(path), tmp_path / "out")
    variants = {r["variant"] for r in summary.rows}
    assert variants == {"raw · glnet, hidden=6, epochs=2", "raw · glnet, hidden=5, lr=3e-3, epochs=2",
                        "raw · probe, hidden=16, epochs=2"}, variants  # each against its own model's defaults
    assert (tmp_path / "out" / "results.md").exists()
    result = run_cli("report", "--store", path, "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    info = info_summary(str(path))
    trained = {(t["model"], t["layer_set"]) for t in info["training"]}
    assert {("glnet", "all"), ("glnet", "visual"), ("probe", "all"), ("probe", "visual")} <= trained
