"""The other published LoRA weight-space datasets (issue 15 §4), as small look-alikes built from the real files:
ProbeX's Model-J (split folders of model_idx_XXXX/pytorch_lora_weights.safetensors, rank 16) and DSiRe's
LoRA-WiSE (a parquet table with one float64 matrix column per tensor, label = the number of images)."""

from __future__ import annotations

import json

import datasets
import numpy as np
from conftest import materialize_to, open_store

from loras import MODULES, base_factors, diffusers_folder


def _rank16(i: int) -> dict:
    """Rank 16 from the real rank-4 factors: four seeded variations of each stacked (SD-1.x shapes, real statistics)."""
    rng = np.random.default_rng(500 + i)
    out = {}
    for m, (a, b) in base_factors(4).items():
        A = np.concatenate([a * (1 + 0.1 * rng.standard_normal()) for _ in range(4)]).astype(np.float32)
        B = np.concatenate([b + 1e-3 * rng.standard_normal(b.shape) for _ in range(4)], axis=1).astype(np.float32)
        out[m] = (A, B)
    return out


def test_model_j_look_alike(tmp_path):
    root = tmp_path / "Model-J__SD_200"
    classes = ("tench", "goldfish", "great_white_shark")
    metadata, k = {}, 0
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for _ in range(n):
            name = f"model_idx_{k:04d}"
            diffusers_folder(root / split / name, _rank16(k))
            metadata[f"{split}/{name}"] = {"category": classes[k % 3]}
            k += 1
    (root / "metadata.json").write_text(json.dumps(metadata))
    store = tmp_path / "s.zarr"
    materialize_to(store, root)
    root_attrs = open_store(store).attrs
    assert {s: v["n"] for s, v in root_attrs["splits"].items()} == {"train": 6, "val": 3, "test": 3}
    assert {m["rank"] for m in root_attrs["modules"]} == {16} and len(root_attrs["modules"]) == len(MODULES)
    assert root_attrs["labels"]["category"]["classes"] == sorted(classes)
    ids = [str(v) for v in open_store(store)["index/val/model_id"][...]]
    assert ids == ["model_idx_0006", "model_idx_0007", "model_idx_0008"]
    key = next(m["key"] for m in root_attrs["modules"] if m["name"].endswith(MODULES[2]))
    np.testing.assert_array_equal(open_store(store)[f"raw/test/{key}/A"][...], np.stack([_rank16(k)[MODULES[2]][0] for k in (9, 10, 11)]))


def test_lora_wise_look_alike(tmp_path):
    """One float64 matrix column per tensor of attn1/attn2 x to_q/to_k/to_v/to_out.0, `label` the number of images,
    `name` the concept; one configuration (rank) per source."""
    rows, sizes, concepts = [], (1, 2, 3), ("pet_cat7", "toy_pikachu1", "scene_barn", "flower_1")
    for c, concept in enumerate(concepts):
        for size in sizes:
            fac = _rank16(10 * c + size)
            row = {"label": size, "name": concept}
            for m, (a, b) in fac.items():
                row[f"unet.{m}.lora.down.weight"] = a[:8].astype(np.float64).tolist()
                row[f"unet.{m}.lora.up.weight"] = b[:, :8].astype(np.float64).tolist()
            rows.append(row)
    folder = tmp_path / "low_8"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    store = tmp_path / "s.zarr"
    summary = materialize_to(store, folder)
    attrs = open_store(store).attrs
    assert attrs["labels"]["label"]["kind"] == "integer" and attrs["labels"]["name"]["kind"] == "categorical"
    assert {m["rank"] for m in attrs["modules"]} == {8} and {m["dtype"] for m in attrs["modules"]} == {"float32"}
    assert sum(v["n"] for v in attrs["splits"].values()) == len(rows)  # 12 rows: the original split, 8 / 1 / 3
    assert any("fewer than 10 adapters" in note for note in summary.warnings)
    root = open_store(store)
    rows_of = root["index/train/row"][...]
    np.testing.assert_array_equal(root["labels/train/label"][...], [rows[r]["label"] for r in rows_of])
    key = next(m["key"] for m in attrs["modules"] if m["name"].endswith(MODULES[0]))
    np.testing.assert_array_equal(root[f"raw/train/{key}/B"][...],
                                  np.asarray([rows[r][f"unet.{MODULES[0]}.lora.up.weight"] for r in rows_of], np.float32))
