"""Adapter files for the layout and alpha tests, derived from the real LoRA files in ../shared/data/real-loras.

The real files (docs: shared/data/real-loras/README.md) are found beside the project (``<root>/../shared``,
or beside the main checkout when this is a git worktree, or ``$PIPELINE_SHARED``). Where they are absent
(a fresh clone), look-alike tensors with the same key names, shapes and statistics are generated instead,
and ``REAL_NOTE`` says so; conftest prints it once per session, so a run never silently tests less.
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
        stem = "lora_unet_unet_" + module.replace(".", "_")
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
