"""The LoRA scale (issue 15 §3): alpha from peft configs, kohya and diffusers .alpha tensors and diffusers' metadata,
recorded per adapter and module, and applied by every dW representation as dW = (alpha / r) B A; every target
module; mixed ranks; float16, bfloat16, float32 and float64 sources."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import materialize_to, open_store

from loras import MODULES, diffusers_folder, factors, peft_folder, save, save_bf16, tensors_of

from pipeline import representations
from pipeline.features import FeaturesConfig, compute_features, module_scale
from pipeline.train import select

MODULE_REPS = [r["name"] for r in representations.describe_all() if r["kind"] == "module"]
Q1 = MODULES[2]


def _modules(store) -> dict[str, dict]:
    return {m["name"]: m for m in open_store(store).attrs["modules"]}


def _features(store, split="train") -> dict[str, np.ndarray]:
    compute_features(FeaturesConfig(store=str(store), reps=",".join(MODULE_REPS), device="cpu", quiet=True))
    root = open_store(store)
    return {name: root[f"features/{split}/{name}"][...] for name in MODULE_REPS}


def _scaled_reference(tmp_path, facs: list[dict], scales: list[dict[str, float]]):
    """The same adapters with B multiplied by their scale and no alpha anywhere: what every dW representation must see."""
    root = tmp_path / "reference"
    for i, (fac, scale) in enumerate(zip(facs, scales)):
        scaled = {m: (a, (b * scale[m]).astype(np.float32)) for m, (a, b) in fac.items()}
        save(root / f"a{i}.safetensors", tensors_of("diffusers", scaled))
    (root / "labels.csv").write_text("file,y\n" + "".join(f"a{i},{i}\n" for i in range(len(facs))))
    store = tmp_path / "reference.zarr"
    materialize_to(store, root)
    assert all(m["alpha"] is None and not m["alpha_varies"] for m in _modules(store).values())
    return store


def _assert_same_features(store, reference):
    got, want = _features(store), _features(reference)
    for name in MODULE_REPS:
        scale = max(float(np.abs(want[name]).max()), 1e-12)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


# --- where alpha comes from -------------------------------------------------------------------------


def test_peft_lora_alpha_scales_every_dw_representation(tmp_path):
    root = tmp_path / "peft"
    facs = [factors(i) for i in range(3)]
    for i, fac in enumerate(facs):
        peft_folder(root / f"a{i}", fac, r=4, lora_alpha=8)
    (root / "labels.csv").write_text("file,y\na0,0\na1,1\na2,2\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    for m in _modules(store).values():
        assert (m["alpha"], m["rank"], m["alpha_varies"], m["alpha_from"]) == (8.0, 4, False, "adapter_config.json")
    _assert_same_features(store, _scaled_reference(tmp_path, facs, [{m: 2.0 for m in MODULES}] * 3))
    # and one number by hand: the top singular value of dW = (alpha / r) B A
    a, b = facs[0][Q1]
    top = np.linalg.svd(2.0 * b.astype(np.float64) @ a, compute_uv=False)[0]
    key = next(i for i, name in enumerate(_modules(store)) if name.endswith(Q1))
    np.testing.assert_allclose(open_store(store)["features/train/dw_spectrum"][0, key, 0], top, rtol=1e-5)


def test_peft_alpha_pattern_and_rslora(tmp_path):
    root = tmp_path / "peft"
    facs = [factors(i) for i in range(2)]
    peft_folder(root / "a0", facs[0], r=4, lora_alpha=8, alpha_pattern={"attn2.to_k": 2})
    peft_folder(root / "a1", facs[1], r=4, lora_alpha=8, use_rslora=True)
    (root / "labels.csv").write_text("file,y\na0,0\na1,1\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    alpha = {name: open_store(store)[f"raw/train/{m['key']}/alpha"][...] for name, m in _modules(store).items()}
    rs = 8 * math.sqrt(4)  # rslora's scale is lora_alpha / sqrt(r): recorded as the alpha with that alpha / r
    for name, values in alpha.items():
        assert _modules(store)[name]["alpha_varies"]
        np.testing.assert_allclose(values, [2.0 if name.endswith("attn2.to_k") else 8.0, rs])
    scales = [{m: (0.5 if m.endswith("attn2.to_k") else 2.0) for m in MODULES}, {m: rs / 4 for m in MODULES}]
    _assert_same_features(store, _scaled_reference(tmp_path, facs, scales))


def test_kohya_alpha_tensors_from_the_real_kohya_names(tmp_path):
    root = tmp_path / "kohya"
    facs = [factors(i) for i in range(3)]
    for i, (fac, alpha) in enumerate(zip(facs, (1.0, 1.0, 16.0))):
        save(root / f"k{i}.safetensors", tensors_of("kohya", fac, alpha=alpha))
    (root / "labels.csv").write_text("file,y\nk0,0\nk1,1\nk2,2\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    for m in _modules(store).values():
        assert m["alpha_varies"] and m["alpha_from"] == "tensor" and m["alpha_column"].endswith(".alpha")
    scales = [{m: s for m in MODULES} for s in (0.25, 0.25, 4.0)]
    _assert_same_features(store, _scaled_reference(tmp_path, facs, scales))


@pytest.mark.parametrize("how", ["alpha tensors", "lora_adapter_metadata"])
def test_diffusers_alpha(tmp_path, how):
    root = tmp_path / "diffusers"
    facs = [factors(i) for i in range(2)]
    for i, fac in enumerate(facs):
        if how == "alpha tensors":
            diffusers_folder(root / f"a{i}", fac, alpha=2.0)
        else:
            diffusers_folder(root / f"a{i}", fac, metadata_alpha=2.0)
    (root / "labels.csv").write_text("file,y\na0,0\na1,1\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    for m in _modules(store).values():
        assert m["alpha"] == 2.0 and m["alpha_from"] == ("tensor" if how == "alpha tensors" else "lora_adapter_metadata")
    _assert_same_features(store, _scaled_reference(tmp_path, facs, [{m: 0.5 for m in MODULES}] * 2))


def test_symlinked_peft_file_in_a_flat_folder_keeps_its_config(tmp_path):
    """The issue's report: peft files linked into a flat folder lost their lora_alpha."""
    runs, flat = tmp_path / "runs", tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        peft_folder(runs / f"r{i}", factors(i), r=4, lora_alpha=16)
        (flat / f"m{i}.safetensors").symlink_to(runs / f"r{i}" / "adapter_model.safetensors")
    (flat / "labels.csv").write_text("file,y\nm0,0\nm1,1\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, flat)
    assert {m["alpha"] for m in _modules(store).values()} == {16.0}


def test_no_alpha_anywhere_is_scale_one_as_before(tmp_path):
    root = tmp_path / "plain"
    for i in range(2):
        diffusers_folder(root / f"a{i}", factors(i))
    (root / "labels.csv").write_text("file,y\na0,0\na1,1\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert all(m["alpha"] is None and m["alpha_column"] is None for m in _modules(store).values())
    np.testing.assert_array_equal(module_scale(np.array([4, 2]), None), [1.0, 1.0])  # a store that records no alpha


def test_adapters_that_say_nothing_of_alpha_beside_ones_that_do_have_scale_one(tmp_path):
    root = tmp_path / "mixed"
    diffusers_folder(root / "a0", factors(0), metadata_alpha=8.0)
    diffusers_folder(root / "a1", factors(1))
    (root / "labels.csv").write_text("file,y\na0,0\na1,1\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    m = _modules(store)[f"unet.{Q1}"]
    np.testing.assert_array_equal(open_store(store)[f"raw/train/{m['key']}/alpha"][...], [8.0, 4.0])  # alpha = r: scale 1


def test_dora_is_refused(tmp_path):
    from conftest import assert_one_line_error, run_cli

    root = tmp_path / "peft"
    peft_folder(root / "a0", factors(0), r=4, lora_alpha=4, use_dora=True)
    (root / "labels.csv").write_text("file,y\na0,0\n")
    assert_one_line_error(run_cli("materialize", "--source", root, "--store", tmp_path / "s.zarr", "--quiet"), "DoRA")
    assert not (tmp_path / "s.zarr").exists()


# --- every rank, every module, every dtype ----------------------------------------------------------


def test_mixed_ranks_with_one_alpha_scale_by_each_adapters_rank(tmp_path):
    root = tmp_path / "peft"
    facs = [factors(0, rank=4), factors(1, rank=2), factors(2, rank=1)]
    for i, fac in enumerate(facs):
        peft_folder(root / f"a{i}", fac, r=fac[Q1][0].shape[0], lora_alpha=8)
    (root / "labels.csv").write_text("file,y\na0,0\na1,1\na2,2\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    m = _modules(store)[f"base_model.model.{Q1}"]
    assert (m["rank"], m["rank_varies"], m["alpha"]) == (4, True, 8.0)
    np.testing.assert_array_equal(open_store(store)[f"raw/train/{m['key']}/rank"][...], [4, 2, 1])
    scales = [{mod: 8.0 / r for mod in MODULES} for r in (4, 2, 1)]
    _assert_same_features(store, _scaled_reference(tmp_path, facs, scales))  # the reference holds the same ragged ranks


def test_any_target_module_and_the_layer_sets(tmp_path):
    """to_k, to_out.0, feed-forward and the text encoder are stored; visual / text still mean attn1 / attn2."""
    extra = {
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": ((4, 320), (2560, 4)),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": ((4, 1280), (320, 4)),
    }
    text = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    root = tmp_path / "all"
    rng = np.random.default_rng(0)
    for i in range(2):
        tensors = tensors_of("diffusers", factors(i))
        for module, (a, b) in extra.items():
            tensors[f"unet.{module}.lora.down.weight"] = (rng.standard_normal(a) / 4).astype(np.float32)
            tensors[f"unet.{module}.lora.up.weight"] = (rng.standard_normal(b) * 1e-3).astype(np.float32)
        tensors[f"{text}.lora.down.weight"] = (rng.standard_normal((4, 768)) / 4).astype(np.float32)
        tensors[f"{text}.lora.up.weight"] = (rng.standard_normal((768, 4)) * 1e-3).astype(np.float32)
        save(root / f"m{i}.safetensors", tensors)
    (root / "labels.csv").write_text("file,y\nm0,0\nm1,1\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    names = list(_modules(store))
    assert len(names) == len(MODULES) + 3 and text in names
    assert {m.split(".")[-1] for m in names} >= {"to_k", "0", "2", "proj", "q_proj"}
    visual = [names[i] for i in select(names, "visual")]
    assert visual and all(".attn1." in n for n in visual) and len(visual) == 4
    assert all(".attn2." in names[i] for i in select(names, "text"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_source_dtypes(tmp_path, dtype):
    root = tmp_path / dtype
    facs = [factors(i) for i in range(2)]
    if dtype == "float64":  # values float32 cannot hold: each is rounded once, to the nearest float32
        rng = np.random.default_rng(0)
        facs = [{m: (a.astype(np.float64), b + 1e-12 * rng.standard_normal(b.shape)) for m, (a, b) in f.items()} for f in facs]
    for i, fac in enumerate(facs):
        if dtype == "bfloat16":
            save_bf16(root / f"m{i}.safetensors", tensors_of("diffusers", fac))
        else:
            save(root / f"m{i}.safetensors", tensors_of("diffusers", fac, dtype=np.dtype(dtype)))
    (root / "labels.csv").write_text("file,y\nm0,0\nm1,1\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    m = _modules(store)[f"unet.{Q1}"]
    assert m["dtype"] == ("float16" if dtype == "float16" else "float32")
    B = open_store(store)[f"raw/train/{m['key']}/B"][...]
    if dtype == "bfloat16":
        import torch

        want = np.stack([torch.from_numpy(f[Q1][1]).to(torch.bfloat16).float().numpy() for f in facs])
    else:
        want = np.stack([f[Q1][1].astype(dtype).astype(m["dtype"]) for f in facs])
    np.testing.assert_array_equal(B, want)  # exact: every source value is held by the stored dtype, or rounded once


def test_config_json_is_read_not_guessed(tmp_path):
    """lora_alpha absent from adapter_config.json is peft's default, 8."""
    root = tmp_path / "peft"
    peft_folder(root / "a0", factors(0), r=4, lora_alpha=8)
    config = json.loads((root / "a0" / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (root / "a0" / "adapter_config.json").write_text(json.dumps(config))
    (root / "labels.csv").write_text("file,y\na0,0\n")
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    assert {m["alpha"] for m in _modules(store).values()} == {8.0}
