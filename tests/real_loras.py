"""The seven real LoRA files of ``../shared/data/real-loras``, or look-alikes generated in their place.

The real files sit beside the project (``<project>/../shared``) on the team's machines and in CI; a user's
clone has no ``../shared``. Then every file is generated here with the same tensor names, shapes, dtypes
and safetensors metadata as the real one (random values, A with std 1/rank and B with std 1e-3, as
measured on the real files), so the tests that read them run everywhere. ``test_look_alikes_match_real``
holds the generator to the real files whenever they are present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PROJECT = Path(__file__).resolve().parents[1]
REAL = PROJECT.parent / "shared" / "data" / "real-loras"

FILES = ("cloneofsimo_rank1_disney.safetensors", "cloneofsimo_rank4_fp16.safetensors", "diffusers_rank4_a.safetensors",
         "diffusers_rank4_b.safetensors", "kohya_rank4.safetensors", "processor_rank4_b.safetensors",
         "processor_rank4_pokemon.safetensors")

# SD-1.x UNet transformer blocks in module order (down, up, mid), with their channel width.
_BLOCKS = ([(f"down_blocks.{b}.attentions.{a}", ch) for b, ch in enumerate((320, 640, 1280)) for a in range(2)]
           + [(f"up_blocks.{b}.attentions.{a}", ch) for b, ch in ((1, 1280), (2, 640), (3, 320)) for a in range(3)]
           + [("mid_block.attentions.0", 1280)])
_TEXT_WIDTH, _TEXT_LAYERS = 768, 12


def _attention(ch: int) -> list[tuple[str, int, int]]:
    """(projection, fan-in, fan-out) of a block's attn1 (self) and attn2 (cross, keys and values from the text)."""
    return [(f"attn{i}.{p}", _TEXT_WIDTH if i == 2 and p in ("to_k", "to_v") else ch, ch)
            for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]


def _named_modules() -> list[tuple[str, int, int]]:
    """The 128 attention projections of the UNet, by their diffusers name, sorted as the files list them."""
    return sorted((f"{block}.transformer_blocks.0.{proj}", fan_in, fan_out)
                  for block, ch in _BLOCKS for proj, fan_in, fan_out in _attention(ch))


def _cloneofsimo_modules() -> list[tuple[str, int, int]]:
    """``unet:{i}`` then ``text_encoder:{i}`` in the order cloneofsimo's injector walks the model: per block the
    four attn1 projections, the GEGLU input projection (fan-out 8 x width), then the four attn2 ones."""
    unet = []
    for _, ch in _BLOCKS:
        attn = _attention(ch)
        unet += [(None, i, o) for _, i, o in attn[:4]] + [(None, ch, 8 * ch)] + [(None, i, o) for _, i, o in attn[4:]]
    text = [(None, _TEXT_WIDTH, _TEXT_WIDTH)] * (4 * _TEXT_LAYERS)
    return ([(f"unet:{i}", fi, fo) for i, (_, fi, fo) in enumerate(unet)]
            + [(f"text_encoder:{i}", fi, fo) for i, (_, fi, fo) in enumerate(text)])


def _kohya(name: str) -> str:
    return "lora_unet_unet_" + name.replace(".", "_")


def _processor(name: str) -> str:
    head, proj = name.rsplit(".attn", 1)[0], name.split(".attn", 1)[1]
    attn, proj = proj.split(".", 1)
    return f"{head}.attn{attn}.processor.{proj.removesuffix('.0')}_lora"


def spec(file: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str] | None]:
    """Every tensor of ``file`` as name -> (shape, dtype), and its safetensors metadata."""
    rank = 1 if "rank1" in file else 4
    dtype = "float16" if "fp16" in file else "float32"
    if file.startswith("cloneofsimo"):
        tensors = {}
        for key, fan_in, fan_out in _cloneofsimo_modules():
            tensors[f"{key}:down"], tensors[f"{key}:up"] = ((rank, fan_in), dtype), ((fan_out, rank), dtype)
        metadata = {f"{key}:rank": str(rank) for key, _, _ in _cloneofsimo_modules()}
        targets = ("GEGLU", "CrossAttention", "Attention") if "disney" in file else ("CrossAttention", "Attention", "GEGLU")
        metadata |= {"unet": "[" + ", ".join(f'"{t}"' for t in targets) + "]", "text_encoder": '["CLIPAttention"]'}
        if "disney" in file:
            tensors |= {"<s1>": ((768,), "float32"), "<s2>": ((768,), "float32")}
            metadata |= {"<s1>": "<embed>", "<s2>": "<embed>"}
        return tensors, metadata
    scheme = file.split("_", 1)[0]
    down, up = {"diffusers": (lambda n: f"unet.{n}.lora.down.weight", lambda n: f"unet.{n}.lora.up.weight"),
                "kohya": (lambda n: f"{_kohya(n)}_lora_down.weight", lambda n: f"{_kohya(n)}_lora_up.weight"),
                "processor": (lambda n: f"{_processor(n)}.down.weight", lambda n: f"{_processor(n)}.up.weight")}[scheme]
    tensors = {}
    for name, fan_in, fan_out in _named_modules():
        tensors[down(name)], tensors[up(name)] = ((rank, fan_in), dtype), ((fan_out, rank), dtype)
    return tensors, (None if scheme == "kohya" else {"format": "pt"})


def generate(file: str, path: Path) -> None:
    """A look-alike of ``file`` at ``path``: the real file's names, shapes, dtypes and metadata, seeded values."""
    tensors, metadata = spec(file)
    rng = np.random.default_rng(FILES.index(file))
    rank = 1 if "rank1" in file else 4
    values = {}
    for key, (shape, dtype) in tensors.items():
        std = 1.0 if len(shape) == 1 else (1 / rank if shape[0] == rank else 1e-3)
        values[key] = (rng.standard_normal(shape) * std).astype(dtype)
    save_file(values, str(path), metadata=metadata)


def folder(cache: Path) -> tuple[Path, bool]:
    """The folder of the seven files, and whether they are the real ones: ``../shared``'s when all are there,
    else ``cache`` with look-alikes generated for the missing ones (the real ones present are copied as they are)."""
    if all((REAL / f).is_file() for f in FILES):
        return REAL, True
    cache.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if not (cache / f).is_file():
            if (REAL / f).is_file():
                (cache / f).write_bytes((REAL / f).read_bytes())
            else:
                generate(f, cache / f)
    return cache, False
