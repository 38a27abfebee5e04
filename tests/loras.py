"""Adapter files for the layout and alpha tests, derived from the real LoRA files in ../shared/data/real-loras.

The real files (docs: shared/data/real-loras/README.md) are found beside the project (``<root>/../shared``,
or beside the main checkout when this is a git worktree, or ``$PIPELINE_SHARED``). Where they are absent
(a fresh clone), look-alike tensors with the same key names, shapes and statistics are generated instead,
and ``REAL_NOTE`` says so; conftest prints it once per session, so a run never silently tests less.

``folder`` gives all seven files: the real ones, or look-alikes of each with the real file's tensor names,
shapes, dtypes and safetensors metadata (``spec``; ``test_look_alikes_match_real`` holds it to the real files
whenever they are present).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]


def _shared() -> Path | None:
    if "PIPELINE_SHARED" in os.environ:  # only there (PIPELINE_SHARED=/nowhere runs the tests as a fresh clone would)
        candidates = [Path(os.environ["PIPELINE_SHARED"])]
        return next((c.resolve() for c in candidates if (c / "data" / "real-loras").is_dir()), None)
    candidates = [ROOT / ".." / "shared"]
    git = ROOT / ".git"
    if git.is_file():  # a git worktree: .git is "gitdir: <main>/.git/worktrees/<name>"
        gitdir = Path(git.read_text().split(":", 1)[1].strip())
        candidates.append(gitdir.parents[2] / ".." / "shared")
    return next((c.resolve() for c in candidates if (c / "data" / "real-loras").is_dir()), None)


SHARED = _shared()
REAL = SHARED / "data" / "real-loras" if SHARED else None
REAL_NOTE = (f"real LoRA files from {REAL}" if REAL else
             "../shared/data/real-loras is ABSENT: layout tests run on generated look-alikes of the real files (same keys and shapes)")

# The first transformer block's modules: every projection of attn1 (self) and attn2 (cross), as in the real files.
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
PROJECTIONS = ("to_k", "to_out.0", "to_q", "to_v")
MODULES = tuple(f"{BLOCK}.{attn}.{p}" for attn in ("attn1", "attn2") for p in PROJECTIONS)


def _shape(module: str, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    cross = ".attn2." in module and module.endswith(("to_k", "to_v"))
    return (rank, 768 if cross else 320), (320, rank)


def base_factors(rank: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (A, B) float32 of the real diffusers rank-4 file (or look-alikes when it is absent)."""
    path = REAL / "diffusers_rank4_a.safetensors" if REAL else None
    if path is not None and path.is_file() and rank == 4:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        return {m: (tensors[f"unet.{m}.lora.down.weight"], tensors[f"unet.{m}.lora.up.weight"]) for m in MODULES}
    rng = np.random.default_rng(4)  # measured on the real files: A std ~ 1/rank, B std ~ 1e-3
    out = {}
    for m in MODULES:
        a, b = _shape(m, rank)
        out[m] = ((rng.standard_normal(a) / rank).astype(np.float32), (rng.standard_normal(b) * 1e-3).astype(np.float32))
    return out


def factors(i: int, rank: int = 4, modules=MODULES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Adapter ``i``: the real factors with B moved by a seeded step (so adapters differ), rank cut or kept."""
    rng = np.random.default_rng(100 + i)
    out = {}
    for m, (a, b) in base_factors(4 if rank <= 4 else rank).items():
        if m in modules:
            a, b = a[:rank], b[:, :rank]
            out[m] = (a.copy(), (b + 1e-3 * rng.standard_normal(b.shape)).astype(np.float32))
    return out


def keys(scheme: str, module: str) -> tuple[str, str, str]:
    """(down key, up key, alpha key) of ``module`` in a naming scheme."""
    if scheme == "diffusers":
        return f"unet.{module}.lora.down.weight", f"unet.{module}.lora.up.weight", f"unet.{module}.alpha"
    if scheme == "peft":  # as peft's save_pretrained writes a UNet adapter
        return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight", ""
    if scheme == "kohya":  # as in kohya_rank4.safetensors: lora_unet_ + the diffusers name with _ for .
        stem = _kohya(module)
        return f"{stem}_lora_down.weight", f"{stem}_lora_up.weight", f"{stem}.alpha"
    raise ValueError(scheme)


def tensors_of(scheme: str, fac: dict, dtype=np.float32, alpha: float | None = None) -> dict[str, np.ndarray]:
    """The tensors of one adapter file in ``scheme``; ``alpha``: .alpha tensors (kohya, diffusers) of that value."""
    out = {}
    for module, (a, b) in fac.items():
        down, up, alpha_key = keys(scheme, module)
        out[down], out[up] = a.astype(dtype), b.astype(dtype)
        if alpha is not None:
            out[alpha_key] = np.asarray(alpha, dtype=np.float32)
    return out


def save(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write a safetensors file (numpy dtypes: float16, float32, float64)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def save_bf16(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write a safetensors file with every matrix as bfloat16 (numpy has no bfloat16: torch writes it)."""
    import torch
    from safetensors.torch import save_file as save_torch

    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) if v.ndim else torch.from_numpy(v)
                for k, v in tensors.items()}, str(path))
    return path


def peft_folder(folder: Path, fac: dict, r: int, lora_alpha: float, **config) -> Path:
    """A peft adapter folder: adapter_model.safetensors + adapter_config.json."""
    save(folder / "adapter_model.safetensors", tensors_of("peft", fac))
    target = sorted({m.rsplit(".", 1)[-1] if not m.endswith(".0") else "to_out.0" for m in fac})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": target, "init_lora_weights": "gaussian",
        **config}))
    return folder


def diffusers_folder(folder: Path, fac: dict, alpha: float | None = None, metadata_alpha: float | None = None) -> Path:
    """A diffusers adapter folder; ``metadata_alpha``: lora_alpha in the file's lora_adapter_metadata (diffusers >= 0.34)."""
    metadata = None
    if metadata_alpha is not None:
        rank = next(iter(fac.values()))[0].shape[0]
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": metadata_alpha})}
    return save(folder / "pytorch_lora_weights.safetensors", tensors_of("diffusers", fac, alpha=alpha), metadata)


# --- the seven real files themselves, or look-alikes of each (same names, shapes, dtypes, metadata) ---------

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
    """The folder of the seven files, and whether they are the real ones: ``REAL`` when all are there, else
    ``cache`` with look-alikes generated for the missing ones (the real ones present are copied as they are)."""
    if REAL and all((REAL / f).is_file() for f in FILES):
        return REAL, True
    cache.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if not (cache / f).is_file():
            if REAL and (REAL / f).is_file():
                (cache / f).write_bytes((REAL / f).read_bytes())
            else:
                generate(f, cache / f)
    return cache, False
