"""The built-in dataset: Stable-Diffusion-1.5-shaped LoRA adapters in the published lora-ws format.

One row per adapter, one nested-list float32 column per safetensors key, ``category_label`` (10
classes), ``category_name``, ``num_images`` and ``rank``, saved with ``save_to_disk`` as a
DatasetDict with a single ``train`` split. The class signal is described in docs/synthetic-data.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import PipelineError
from .loraws import LoraModule, builtin_home, matrix_column, write_dataset

CLASSES = ("airplane", "bird", "car", "cat", "dog", "fish", "fruit", "ship", "snake", "vegetable")
CLASS_MEMBERS = {
    "airplane": ("airliner", "warplane", "airship"),
    "bird": ("goldfinch", "robin", "jay"),
    "car": ("sports car", "convertible", "cab"),
    "cat": ("tabby cat", "Persian cat", "Siamese cat"),
    "dog": ("beagle", "golden retriever", "pug"),
    "fish": ("goldfish", "tench", "lionfish"),
    "fruit": ("banana", "orange", "lemon"),
    "ship": ("container ship", "liner", "fireboat"),
    "snake": ("king snake", "green mamba", "garter snake"),
    "vegetable": ("broccoli", "cucumber", "zucchini"),
}
# The 16 transformer blocks of the SD-1.5 UNet and their width C.
BLOCKS = (
    [(f"down_blocks.0.attentions.{i}", 320) for i in range(2)]
    + [(f"down_blocks.1.attentions.{i}", 640) for i in range(2)]
    + [(f"down_blocks.2.attentions.{i}", 1280) for i in range(2)]
    + [("mid_block.attentions.0", 1280)]
    + [(f"up_blocks.1.attentions.{i}", 1280) for i in range(3)]
    + [(f"up_blocks.2.attentions.{i}", 640) for i in range(3)]
    + [(f"up_blocks.3.attentions.{i}", 320) for i in range(3)]
)
PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
CROSS_DIM = 768  # text-encoder width: the input of attn2.to_k and attn2.to_v
WORLD_SEED = 20240501  # fixes the class structure; --seed varies only the adapters
SYNTH_VERSION = 2  # bump when the generated numbers change; part of the built-in dataset's folder name
SIGNAL = 1.5  # size of the class direction in B, in units of B's per-entry noise
SCALE_SPREAD = 0.05  # log-normal spread of the class-and-module scale of B
MODULE_JITTER = 0.1  # log-normal spread of each adapter's own per-module scale, which hides the class scale
_BATCH = 256  # rows generated at once; fixed so the data do not depend on memory


def sd15_modules(projections: tuple[str, ...] = ("q", "v")) -> list[LoraModule]:
    """The SD-1.5 attention LoRA modules for the given projections, with real names and shapes."""
    if not projections:
        raise PipelineError("--modules names no projection; give some of q,k,v,out (e.g. q,v)")
    unknown = sorted(set(projections) - set(PROJECTIONS))
    if unknown:
        raise PipelineError(f"--modules: unknown projection(s) {', '.join(unknown)}; choose from q,k,v,out")
    modules = []
    for block, width in BLOCKS:
        for attn in ("attn1", "attn2"):
            for short in projections:
                cross = attn == "attn2" and short in ("k", "v")
                name = f"unet.{block}.transformer_blocks.0.{attn}.{PROJECTIONS[short]}"
                modules.append(LoraModule(name, CROSS_DIM if cross else width, width))
    return sorted(modules, key=lambda m: m.name)


def _class_structure(modules: list[LoraModule]):
    """Per class and module: a scale of B and a unit direction in B's output space."""
    rng = np.random.default_rng(WORLD_SEED)
    scales = np.exp(SCALE_SPREAD * rng.standard_normal((len(CLASSES), len(modules))))
    directions = []
    for module in modules:
        u = rng.standard_normal((len(CLASSES), module.out_features))
        directions.append((u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32))
    return scales.astype(np.float32), directions


def _batch(start: int, n: int, seed: int, rank: int, modules, scales, directions) -> pa.Table:
    rng = np.random.default_rng([seed, start // _BATCH])
    label = rng.integers(0, len(CLASSES), n)
    member = rng.integers(0, 3, n)
    num_images = rng.integers(4, 17, n)
    strength = SIGNAL * np.sqrt(num_images / 10.0)  # more training images, a clearer concept
    global_scale = np.exp(0.2 * rng.standard_normal(n))  # adapter-wide scale that hides the class scale
    jitter = np.exp(MODULE_JITTER * rng.standard_normal((n, len(modules))))  # and a per-module one
    columns = {}
    for m, module in enumerate(modules):
        down = rng.standard_normal((n, rank, module.in_features), dtype=np.float32) / rank
        noise = rng.standard_normal((n, module.out_features, rank), dtype=np.float32)
        mix = rng.standard_normal((n, 1, rank)).astype(np.float32)
        signal = directions[m][label][:, :, None] * mix * strength[:, None, None].astype(np.float32)
        sigma = (1e-3 * scales[label, m] * global_scale * jitter[:, m]).astype(np.float32)[:, None, None]
        up = sigma * (noise + signal)
        columns[module.down] = matrix_column(down)
        columns[module.up] = matrix_column(up.astype(np.float32))
    names = [CLASSES[i] for i in label]
    columns["category_label"] = pa.array(names)
    columns["category_name"] = pa.array([CLASS_MEMBERS[c][k] for c, k in zip(names, member)])
    columns["num_images"] = pa.array(num_images.astype(np.int64))
    columns["rank"] = pa.array(np.full(n, rank, dtype=np.int64))
    return pa.table(columns)


def write_synthetic(out: str | Path, n: int = 1000, rank: int = 1, projections=("q", "v"), seed: int = 0, progress=None) -> Path:
    """Write ``n`` synthetic adapters to ``out`` (a save_to_disk DatasetDict), in bounded memory.

    The shards are written straight into the ``save_to_disk`` layout (``train/data-XXXXX-of-YYYYY.arrow``
    plus its JSON), so every byte is written once: going through one big Arrow file and
    ``save_to_disk`` wrote the data twice and needed twice its size on disk.
    """
    if n < 1 or rank < 1:
        raise PipelineError("--n and --rank must be at least 1")
    out = Path(out)
    if out.exists():
        raise PipelineError(f"{out} already exists; choose another --out or remove it")
    modules = sd15_modules(tuple(projections))
    scales, directions = _class_structure(modules)
    starts = range(0, n, _BATCH)

    def batches():
        for start in starts:
            table = _batch(start, min(_BATCH, n - start), seed, rank, modules, scales, directions)
            if progress:
                progress(table.num_rows)
            yield table

    fingerprint = f"synth-v{SYNTH_VERSION}-n{n}-r{rank}-{''.join(projections)}-s{seed}"
    return write_dataset(out, batches(), len(starts), _BATCH, modules, rank, fingerprint)


BUILTIN = {"n": 1000, "rank": 1, "projections": ("q", "v"), "seed": 0}


def builtin_dataset(home: str | Path | None = None, on_generate=None) -> Path:
    """The built-in default dataset: generated once under ``home`` (default ``loraws.builtin_home()``), then reused.

    Silent; ``on_generate(path, n)`` is called just before the ``n`` adapters are generated (seconds), so that a
    caller can say so.
    """
    name = "lora-synth-v{version}-n{n}-r{rank}-qv-s{seed}".format(version=SYNTH_VERSION, **BUILTIN)
    path = Path(home or builtin_home()) / name
    if not path.exists():
        if on_generate:
            on_generate(path, BUILTIN["n"])
        write_synthetic(path, BUILTIN["n"], BUILTIN["rank"], BUILTIN["projections"], BUILTIN["seed"])
    return path
