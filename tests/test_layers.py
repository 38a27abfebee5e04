"""LoRA column naming schemes, A/B pairing, safe Zarr keys, and the real adapter files end to end."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import loras
from conftest import materialize_to, open_store
from safetensors import safe_open
from safetensors.numpy import load_file

from pipeline.errors import PipelineError
from pipeline.layers import pair_modules, parse_lora_column, safe_key, select_modules
from pipeline.materialize import MaterializeConfig, plan
from pipeline.sources import open_source

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


# --- parse_lora_column ------------------------------------------------------------------------------


@pytest.mark.parametrize("column, expected", [
    # diffusers
    (f"unet.{BLOCK}.to_k.lora.down.weight", ("diffusers", f"unet.{BLOCK}.to_k", "A")),
    (f"unet.{BLOCK}.to_out.0.lora.up.weight", ("diffusers", f"unet.{BLOCK}.to_out.0", "B")),
    # peft
    (f"base_model.model.{BLOCK}.to_q.lora_A.weight", ("peft", f"base_model.model.{BLOCK}.to_q", "A")),
    (f"base_model.model.{BLOCK}.to_q.lora_B.weight", ("peft", f"base_model.model.{BLOCK}.to_q", "B")),
    (f"base_model.model.{BLOCK}.to_q.lora_A.default.weight", ("peft", f"base_model.model.{BLOCK}.to_q", "A")),
    (f"base_model.model.{BLOCK}.to_q.lora_B.default.weight", ("peft", f"base_model.model.{BLOCK}.to_q", "B")),
    # kohya (sd-scripts): a dot before lora_down
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight",
     ("kohya", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", "A")),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight",
     ("kohya", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", "B")),
    # old attention processors
    (f"{BLOCK}.processor.to_k_lora.down.weight", ("processor", f"{BLOCK}.to_k", "A")),
    (f"{BLOCK}.processor.to_out_lora.up.weight", ("processor", f"{BLOCK}.to_out", "B")),
    # cloneofsimo index keys
    ("unet:0:down", ("index", "unet:0", "A")),
    ("unet:127:up", ("index", "unet:127", "B")),
    ("text_encoder:12:down", ("index", "text_encoder:12", "A")),
])
def test_parse_lora_column_schemes(column, expected):
    assert parse_lora_column(column) == expected


@pytest.mark.parametrize("role, expected", [("down", "A"), ("up", "B")])
def test_parse_kohya_underscore_variant(role, expected):
    """The kohya file in real-loras writes '_lora_down.weight' (no dot)."""
    module = "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    assert parse_lora_column(f"{module}_lora_{role}.weight") == ("kohya", module, expected)


def test_pair_kohya_underscore_variant_with_alpha():
    mod = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    modules, alphas = pair_modules([f"{mod}_lora_down.weight", f"{mod}_lora_up.weight", f"{mod}.alpha"])
    assert [(m.scheme, m.name, m.alpha) for m in modules] == [("kohya", mod, f"{mod}.alpha")]
    assert alphas == [f"{mod}.alpha"]


@pytest.mark.parametrize("column", [
    "category_label", "<s1>", "<s2>", "rank", "num_images", "unet.to_q.weight", "unet.to_q.lora.down.bias",
    "unet.to_q.lora.middle.weight", "lora_unet_x.alpha", "unet:x:down", "unet:0:left",
])
def test_parse_lora_column_rejects_others(column):
    assert parse_lora_column(column) is None


# --- pair_modules -----------------------------------------------------------------------------------


def test_pair_modules_pairs_and_sorts():
    columns = ["label", "b.lora.up.weight", "a.lora_B.weight", "b.lora.down.weight", "a.lora_A.weight", "unet:3:up", "unet:3:down"]
    modules, alphas = pair_modules(columns)
    assert alphas == []
    assert [(m.name, m.scheme, m.down, m.up, m.alpha) for m in modules] == [
        ("a", "peft", "a.lora_A.weight", "a.lora_B.weight", None),
        ("b", "diffusers", "b.lora.down.weight", "b.lora.up.weight", None),
        ("unet:3", "index", "unet:3:down", "unet:3:up", None),
    ]
    assert [m.key for m in modules] == ["a", "b", "unet_3"]


def test_pair_modules_kohya_alpha():
    mod = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    modules, alphas = pair_modules([f"{mod}.lora_down.weight", f"{mod}.lora_up.weight", f"{mod}.alpha", "orphan.alpha"])
    (m,) = modules
    assert (m.scheme, m.name, m.alpha) == ("kohya", mod, f"{mod}.alpha")
    assert alphas == [f"{mod}.alpha"]  # an alpha with no module is not claimed


@pytest.mark.parametrize("columns, fragment", [
    (["x.lora.down.weight"], "without its up matrix"),
    (["x.lora.up.weight"], "without its down matrix"),
    (["x.lora.down.weight", "x.lora.up.weight", "x.lora_A.weight"], "two A columns"),
])
def test_pair_modules_errors(columns, fragment):
    with pytest.raises(PipelineError, match=re.escape(fragment)):
        pair_modules(columns)


def test_colliding_keys_are_made_unique():
    modules, _ = pair_modules(["a/b.lora.down.weight", "a/b.lora.up.weight", "a_b.lora.down.weight", "a_b.lora.up.weight"])
    assert sorted(m.key for m in modules) == ["a_b", "a_b-2"]
    assert len({m.key for m in modules}) == 2


def test_select_modules():
    modules, _ = pair_modules(["u.attn1.q.lora.down.weight", "u.attn1.q.lora.up.weight", "u.attn2.q.lora.down.weight",
                               "u.attn2.q.lora.up.weight"])
    assert [m.name for m in select_modules(modules, None)] == ["u.attn1.q", "u.attn2.q"]
    assert [m.name for m in select_modules(modules, r"attn2")] == ["u.attn2.q"]
    with pytest.raises(PipelineError, match="matches no LoRA module"):
        select_modules(modules, "attn9")
    with pytest.raises(PipelineError, match="not a valid regular expression"):
        select_modules(modules, "(")


# --- safe_key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "../../x", "..", ".", "", "/", "a/../../b", "..\\..\\x", "~/x", "__private", ".hidden", "a b:c/d", "unet:0", "ä/ö", "\x00",
    "zarr.json", "c/0/0",
])
def test_safe_key_cannot_escape(name):
    key = safe_key(name)
    assert key and re.fullmatch(r"[A-Za-z0-9._-]+", key), key
    assert not key.startswith(".") and not key.startswith("__"), key
    assert "/" not in key and "\\" not in key and key not in (".", "..")


def test_safe_key_keeps_ordinary_names():
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert safe_key(name) == name
    assert safe_key("unet:12") == "unet_12"


# --- the real adapter files -------------------------------------------------------------------------

_DOWN = re.compile(r"([._])lora([._])down\.weight$|:down$")


def _up_of(down: str) -> str:
    match = _DOWN.search(down)
    return down[:match.start()] + (f"{match[1]}lora{match[2]}up.weight" if match[1] else ":up")


def _adapter_folder(tmp_path: Path, real: Path, file: str) -> Path:
    folder = tmp_path / "adapters"
    folder.mkdir()
    for i in range(3):
        shutil.copyfile(real / file, folder / f"adapter{i}.safetensors")
    (folder / "labels.csv").write_text("file,label\nadapter0.safetensors,cat\nadapter1.safetensors,dog\nadapter2.safetensors,cat\n")
    return folder


@pytest.mark.parametrize("file", loras.FILES)
def test_real_adapters_pair_and_round_trip(tmp_path, real_lora_dir, file):
    tensors = load_file(str(real_lora_dir / file))
    downs = sorted(k for k in tensors if _DOWN.search(k))
    assert downs and all(_up_of(d) in tensors for d in downs)
    folder = _adapter_folder(tmp_path, real_lora_dir, file)

    # Every module pairs (planning reads only metadata, so all of them can be checked cheaply).
    source = open_source(str(folder))
    p = plan(source, MaterializeConfig(store=str(tmp_path / "unused")))
    assert len(p.modules) == len(downs)
    assert sorted((m.module.down, m.module.up) for m in p.modules) == [(d, _up_of(d)) for d in downs]
    for m in p.modules:
        assert (m.rank, m.down.cols) == tensors[m.module.down].shape
        assert (m.up.rows, m.rank) == tensors[m.module.up].shape

    # Store a spread of modules (first, last and some between) and compare every value.
    picked = [m.module for m in p.modules][:: max(1, len(p.modules) // 5)] + [p.modules[-1].module]
    regex = "|".join(f"^{re.escape(m.name)}$" for m in picked)
    store = tmp_path / "s.zarr"
    materialize_to(store, folder, layers=regex)
    root = open_store(store)
    attrs = root.attrs.asdict()
    assert sorted(m["name"] for m in attrs["modules"]) == sorted({m.name for m in picked})
    assert sorted(layer["name"] for layer in attrs["layers"]) == sorted(c for m in picked for c in (m.down, m.up))
    fp16 = tensors[downs[0]].dtype == np.float16
    for m in attrs["modules"]:
        assert m["dtype"] == ("float16" if fp16 else "float32")
        for split in ("train", "val", "test"):
            A, B = root[f"raw/{split}/{m['key']}/A"][...], root[f"raw/{split}/{m['key']}/B"][...]
            np.testing.assert_array_equal(root[f"index/{split}/row"][...], np.arange(3))
            assert A.dtype == tensors[m["down"]].dtype  # fp16 is stored exactly, as fp16
            np.testing.assert_array_equal(A, np.stack([tensors[m["down"]]] * 3))
            np.testing.assert_array_equal(B, np.stack([tensors[m["up"]]] * 3))
    assert [str(c) for c in root["labels/train/label"].attrs["classes"]] == ["cat", "dog"]
    np.testing.assert_array_equal(root["labels/train/label"][...], [0, 1, 0])
    np.testing.assert_array_equal(root["index/train/model_id"][...], [f"adapter{i}.safetensors" for i in range(3)])
    non_lora = sorted(k for k in tensors if tensors[k].ndim != 2)
    assert attrs["ignored_columns"] == non_lora  # modules left out by --layers are not "ignored"
    if file.startswith("cloneofsimo_rank1"):
        assert non_lora == ["<s1>", "<s2>"]


def test_real_adapter_whole_file_stored(tmp_path, real_lora_dir):
    """One file with every module stored (the processor scheme, whose module names are rebuilt): names and every value."""
    file = "processor_rank4_b.safetensors"
    tensors = load_file(str(real_lora_dir / file))
    downs = sorted(k for k in tensors if _DOWN.search(k))
    folder = _adapter_folder(tmp_path, real_lora_dir, file)
    store = tmp_path / "s.zarr"
    materialize_to(store, folder)
    root = open_store(store)
    attrs = root.attrs.asdict()
    assert len(attrs["modules"]) == len(downs) == 128
    assert sorted((m["down"], m["up"]) for m in attrs["modules"]) == [(d, _up_of(d)) for d in downs]
    assert attrs["ignored_columns"] == []
    assert sorted(layer["name"] for layer in attrs["layers"]) == sorted(tensors)
    assert len({m["key"] for m in attrs["modules"]}) == 128
    for m in attrs["modules"]:
        assert m["scheme"] == "processor"
        assert m["down"] == m["name"].rsplit(".", 1)[0] + ".processor." + m["name"].rsplit(".", 1)[1] + "_lora.down.weight"
        for split in ("train", "test"):
            A, B = root[f"raw/{split}/{m['key']}/A"][...], root[f"raw/{split}/{m['key']}/B"][...]
            np.testing.assert_array_equal(A, np.stack([tensors[m["down"]]] * 3))
            np.testing.assert_array_equal(B, np.stack([tensors[m["up"]]] * 3))


# --- the look-alikes that stand in for them where ../shared is absent ------------------------------


def _contents(path: Path) -> tuple[dict, dict | None]:
    with safe_open(str(path), "np") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), str(f.get_tensor(k).dtype)) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("file", loras.FILES)
def test_look_alike_is_what_its_spec_says(tmp_path, file):
    """A generated file holds exactly the spec's tensors and metadata, with the real files' scales (A ~ 1/rank, B ~ 1e-3)."""
    loras.generate(file, tmp_path / file)
    tensors, metadata = loras.spec(file)
    assert _contents(tmp_path / file) == (tensors, metadata)
    values = load_file(str(tmp_path / file))
    rank = 1 if "rank1" in file else 4
    downs = [v.astype(np.float64) for k, v in values.items() if _DOWN.search(k)]
    ups = [values[_up_of(k)].astype(np.float64) for k in values if _DOWN.search(k)]
    assert len(downs) in (128, 192)
    assert abs(np.concatenate([d.ravel() for d in downs]).std() * rank - 1) < 0.05
    assert abs(np.concatenate([u.ravel() for u in ups]).std() * 1e3 - 1) < 0.05


@pytest.mark.parametrize("file", loras.FILES)
def test_look_alikes_match_real(file):
    """The generator's names, shapes, dtypes and metadata are the real file's (when ../shared is here to compare)."""
    if loras.REAL is None or not (loras.REAL / file).is_file():
        pytest.skip(f"SKIPPED: the real {file} is absent ({loras.REAL_NOTE}), so its look-alike cannot be checked against it")
    assert loras.spec(file) == _contents(loras.REAL / file)
