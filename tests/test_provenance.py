"""pipeline/provenance.py: the one content hasher, pinned to the digests stores already hold, and the one time stamp."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import provenance, representations, sources, zoo
from pipeline.train import config_hash


# Digests the code made before they all went through provenance.content_hash. Stores on disk record them (a
# configuration's hash names runs/<digest>; sources' fingerprints and spec hashes are in the attrs): a change here
# orphans every existing store's runs and marks every feature stale. Only an intended format change updates them.
CONFIG = {"train_version": 1, "reps": [{"name": "dw_norms", "spec_hash": "abc"}], "lr": 0.001, "label": "category_label",
          "seed": 42}


def test_configuration_hash_is_pinned():
    assert config_hash(CONFIG) == "4e09ced83e9ff31a"
    assert provenance.content_hash(CONFIG, length=16) == "4e09ced83e9ff31a"


@pytest.mark.parametrize("name, digest", [("simple_stats", "0151c4c2b5da2b57"), ("dw_spectrum", "3b283798cebef0b1"),
                                          ("dw_stats", "5ad8ae451670b9d4"), ("dw_probe", "a9bc038301105705")])
def test_spec_hash_is_pinned(name, digest):
    """Bumping a representation's version or parameters changes its hash on purpose: update the pin then."""
    assert representations.get(name).spec_hash() == digest


def test_source_fingerprint_hash_is_pinned():
    payload = {"kind": "safetensors", "files": [["a.safetensors", 10, 1.5]], "path": Path("/x/y")}  # default=str: the Path
    assert sources._digest(payload) == "34dbce85d67c9148c27212256c9952e7"


def test_zoo_digests_are_pinned():
    """ZooConfig().digest() names the built zoo's folder: changing the defaults changes it on purpose."""
    assert zoo._digest({"modules": ("a", "b"), "n": 3}) == "c00cd4445e20c83d"
    assert zoo.ZooConfig().digest() == "b6e2efa4be9e5141"


def test_layers_hash_is_pinned():
    names = ["simple_stats:down_blocks.0", "simple_stats:up_blocks.1"]
    assert provenance.digest("\n".join(names).encode(), length=16) == "ebd2b7750f03a100"


def test_content_hash_is_sorted_key_json():
    assert provenance.content_hash({"b": 1, "a": [2]}, length=64) == provenance.content_hash({"a": [2], "b": 1}, length=64)
    assert len(provenance.content_hash({}, length=32)) == 32
    with pytest.raises(TypeError):
        provenance.content_hash({"path": Path("x")}, length=16)  # no silent str() unless the caller asks for it


def test_utc_stamp_is_iso_8601_utc():
    assert provenance.utc_stamp(0) == "1970-01-01T00:00:00Z"
    assert provenance.utc_stamp(1_700_000_000.9) == "2023-11-14T22:13:20Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", provenance.utc_stamp())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", provenance.stamp()["at"])
