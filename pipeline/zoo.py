"""`pipeline zoo`: a LoRA dataset made by really fine-tuning a miniature Stable-Diffusion UNet, offline.

The base is a diffusers ``UNet2DConditionModel`` with SD-1.5's block structure (cross-attention down
blocks, a cross-attention mid block, cross-attention up blocks), so its attention modules carry SD's
names (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``). It is trained briefly as a
DDPM denoiser on half of scikit-learn's 8x8 digits, conditioned on a fixed "prompt" embedding of the
digit's name, and cached after the first build (``base_model``).

Each adapter follows the published recipe: peft ``LoraConfig(r=rank, lora_alpha=rank,
init_lora_weights="gaussian", target_modules=["to_q", "to_v"])`` on the frozen base, fine-tuned with
the denoising loss on 4-16 images of one digit taken from the other half, the digit being its label
(``train_adapter``, a pure function of (config, index, base)). Adapters are trained in parallel by
dask worker processes, each finished one is kept as a .safetensors file, and a rerun trains only the
missing ones (``build_zoo``). The result is written in the lora-ws format of ``pipeline synth``.
docs/zoo.md says why each number is what it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pyarrow as pa

from .errors import PipelineError
from .provenance import content_hash
from .loraws import LoraModule, builtin_home, matrix_column, write_dataset

ZOO_VERSION = 1  # bump when the adapters a config produces change
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORLD_SEED = 20241128  # fixes the base model, its data half and the prompt embeddings; --seed varies the adapters
UNET = {  # SD-1.5's structure at 1/20 of its width, for 8x8 one-channel images
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": (16, 32, 32), "norm_num_groups": 8, "attention_head_dim": 4, "cross_attention_dim": 32,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
TIMESTEPS = 1000  # DDPM's, as in SD
EVAL_REPEATS = 8  # noise draws per image for the before/after loss of an adapter
_BATCH_ROWS = 256  # adapters per Arrow record batch when the dataset is assembled


@dataclass(frozen=True)
class ZooConfig:
    """Everything that decides a zoo's bytes; saved in it (zoo.json) and in its partial work folder."""

    n: int = 500
    rank: int = 1
    steps: int = 200
    lr: float = 1e-2
    seed: int = 0
    min_images: int = 4
    max_images: int = 16
    base_steps: int = 1000
    base_batch: int = 64
    base_lr: float = 2e-3

    def base_spec(self) -> dict:
        return {"version": ZOO_VERSION, "unet": UNET, "steps": self.base_steps, "batch": self.base_batch, "lr": self.base_lr}

    def digest(self) -> str:
        return _digest(asdict(self) | {"version": ZOO_VERSION, "unet": UNET})


def _digest(payload) -> str:
    return content_hash(payload, length=16, default=list)  # 16, list: the names of built zoos and base models


def _require_packages() -> None:
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise PipelineError(f"pipeline zoo needs diffusers, peft and scikit-learn ({exc.name} is missing): "
                            "pip install -e '.[zoo]'") from None


@contextlib.contextmanager
def _one_thread():
    """One torch thread: the same bytes whatever the machine's core count, and no two workers fighting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # (1797, 1, 8, 8) float32 in [-1, 1]
    labels: np.ndarray  # (1797,) int64
    base_rows: np.ndarray  # the half the base model is trained on
    adapter_rows: tuple[np.ndarray, ...]  # per digit: the rows adapters are fine-tuned on (the other half)


def digits() -> Digits:
    """scikit-learn's 8x8 digits (shipped inside the package), split once into base and adapter halves."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16 -> [-1, 1]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(WORLD_SEED).permutation(len(labels))
    base, rest = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    return Digits(images, labels, base, tuple(rest[labels[rest] == d] for d in range(len(DIGITS))))


def prompts(labels):
    """(n,) digit -> (n, 2, cross_attention_dim): a fixed embedding of "a handwritten <digit name>".

    Stands in for SD's frozen text encoder: a generic token, then the digit's name token.
    """
    import torch

    table = torch.randn(len(DIGITS) + 1, UNET["cross_attention_dim"], generator=torch.Generator().manual_seed(WORLD_SEED))
    labels = torch.as_tensor(labels)
    return torch.stack([table[0].expand(len(labels), -1), table[1 + labels]], dim=1)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET)


def _denoising_loss(unet, scheduler, x0, context, generator):
    """The DDPM training loss SD's LoRA scripts use: predict the noise added at a random timestep."""
    import torch

    t = torch.randint(0, TIMESTEPS, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    predicted = unet(scheduler.add_noise(x0, noise, t), t, context).sample
    return torch.nn.functional.mse_loss(predicted, noise)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TIMESTEPS)


# --- the base model --------------------------------------------------------------------------------


def train_base(config: ZooConfig, progress=None) -> tuple[dict, dict]:
    """(state dict as numpy, {"loss_first", "loss_last"}): the base UNet, trained on the base half."""
    import torch

    data = digits()
    images, labels = torch.from_numpy(data.images[data.base_rows]), data.labels[data.base_rows]
    context = prompts(labels)
    with _one_thread(), torch.random.fork_rng():
        torch.manual_seed(WORLD_SEED)  # diffusers initialises the weights from the global generator
        unet = build_unet()
        generator = torch.Generator().manual_seed(WORLD_SEED)
        scheduler = _scheduler()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=config.base_lr)
        losses = []
        for _ in range(config.base_steps):
            batch = torch.randint(0, len(images), (config.base_batch,), generator=generator)
            loss = _denoising_loss(unet, scheduler, images[batch], context[batch], generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress:
                progress(1)
    window = max(1, min(100, len(losses) // 5))
    state = {name: value.detach().numpy().copy() for name, value in unet.state_dict().items()}
    return state, {"loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:]))}


def base_model(config: ZooConfig, cache_dir: str | Path, progress=None) -> tuple[dict, dict]:
    """The base UNet's state and training summary, trained once and cached in ``cache_dir``."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    spec = config.base_spec()
    path = Path(cache_dir) / f"zoo-base-v{ZOO_VERSION}-{_digest(spec)}.safetensors"
    if path.exists():
        with safe_open(str(path), "np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, json.loads(f.metadata()["summary"])
    state, summary = train_base(config, progress)
    summary = summary | {"spec": spec, "file": path.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_file(state, str(partial), metadata={"summary": json.dumps(summary)})
    os.replace(partial, path)  # whole or absent
    return state, summary


# --- one adapter -------------------------------------------------------------------------------------


@dataclass
class Adapter:
    index: int
    label: int
    num_images: int
    matrices: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)  # module -> (down (r, in), up (out, r))
    loss_before: float
    loss_after: float
    seconds: float


def _lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])


def train_adapter(index: int, config: ZooConfig, base: dict) -> Adapter:
    """Adapter ``index`` of the zoo: a pure function of (config, index, base state), same bytes every time."""
    import torch

    started = time.perf_counter()
    data = digits()
    rng = np.random.default_rng([config.seed, index])
    label = int(rng.integers(len(DIGITS)))
    num_images = int(rng.integers(config.min_images, config.max_images + 1))
    rows = rng.choice(data.adapter_rows[label], num_images, replace=False)
    images = torch.from_numpy(data.images[rows])
    context = prompts(np.full(num_images, label))
    with _one_thread(), torch.random.fork_rng():
        torch.manual_seed(int(rng.integers(2**62)))  # peft's gaussian init draws from the global generator
        unet = build_unet()
        unet.load_state_dict({name: torch.from_numpy(value) for name, value in base.items()})
        unet.requires_grad_(False)
        unet.add_adapter(_lora_config(config.rank))
        trainable = [p for p in unet.parameters() if p.requires_grad]
        scheduler = _scheduler()
        evaluation = int(rng.integers(2**62))

        def held_loss() -> float:  # the same noise and timesteps before and after training
            with torch.no_grad():
                repeated = images.repeat(EVAL_REPEATS, 1, 1, 1)
                generator = torch.Generator().manual_seed(evaluation)
                return _denoising_loss(unet, scheduler, repeated, context.repeat(EVAL_REPEATS, 1, 1), generator).item()

        before = held_loss()
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        optimizer = torch.optim.AdamW(trainable, lr=config.lr)
        for _ in range(config.steps):  # one batch per step: all of the adapter's images, as SD scripts do with <= 16
            loss = _denoising_loss(unet, scheduler, images, context, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = held_loss()
    matrices = {}
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            matrices[f"unet.{name}"] = (module.lora_A["default"].weight.detach().numpy().copy(),
                                        module.lora_B["default"].weight.detach().numpy().copy())
    return Adapter(index, label, num_images, dict(sorted(matrices.items())), before, after, time.perf_counter() - started)


def _save_adapter(folder: Path, adapter: Adapter) -> None:
    """One finished adapter as a .safetensors LoRA file (lora-ws key names), written whole or not at all."""
    from safetensors.numpy import save_file

    tensors = {}
    for module, (down, up) in adapter.matrices.items():
        tensors[f"{module}.lora.down.weight"] = down
        tensors[f"{module}.lora.up.weight"] = up
    meta = {"label": adapter.label, "num_images": adapter.num_images, "loss_before": adapter.loss_before,
            "loss_after": adapter.loss_after, "seconds": adapter.seconds}
    path = folder / f"{adapter.index:06d}.safetensors"
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"adapter": json.dumps(meta)})
    os.replace(partial, path)


def _adapter_meta(path: Path) -> dict:
    """An adapter file's label, image count, losses and seconds: its header only, no tensor is read."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return json.loads(f.metadata()["adapter"])


def _load_adapter(path: Path) -> Adapter:
    from safetensors import safe_open

    meta = _adapter_meta(path)
    with safe_open(str(path), "np") as f:
        modules = sorted({key.rsplit(".lora.", 1)[0] for key in f.keys()})
        matrices = {m: (f.get_tensor(f"{m}.lora.down.weight"), f.get_tensor(f"{m}.lora.up.weight")) for m in modules}
    return Adapter(int(path.stem), meta["label"], meta["num_images"], matrices, meta["loss_before"], meta["loss_after"],
                   meta["seconds"])


# --- the whole zoo -------------------------------------------------------------------------------------


def _work_folder(out: Path, config: ZooConfig) -> Path:
    """``.<name>.partial`` beside ``out``: the finished adapters of an interrupted build, for the same config only."""
    work = out.parent / f".{out.name}.partial"
    saved = work / "config.json"
    if saved.exists():
        if json.loads(saved.read_text()) != asdict(config):
            raise PipelineError(f"{work} holds an unfinished zoo with other settings; rerun with those settings "
                                f"({saved}) to resume it, or remove the folder")
    else:
        (work / "adapters").mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(asdict(config), indent=2))
    return work


def _train_all(todo: list[int], config: ZooConfig, base: dict, folder: Path, workers: int | None, scheduler: str | None,
               progress) -> None:
    """Train adapters ``todo`` on dask worker processes; each is saved as soon as it arrives.

    ``workers=0`` (and no scheduler): one after another in this process, without dask.
    """
    from dask.distributed import as_completed

    from .cluster import Session, scheduler_address

    if workers == 0 and not scheduler_address(scheduler):
        for index in todo:
            _save_adapter(folder, train_adapter(index, config, base))
            if progress:
                progress(1)
        return
    with Session(scheduler, workers or os.cpu_count() or 1) as session:
        client = session.client()
        shared = client.scatter(base, broadcast=True)
        futures = client.map(train_adapter, todo, config=config, base=shared, pure=False)
        for future in as_completed(futures):
            adapter = future.result()
            _save_adapter(folder, adapter)
            if progress:
                progress(1)


def _tables(adapters: list[Path], modules: list[LoraModule], rank: int):
    for start in range(0, len(adapters), _BATCH_ROWS):
        batch = [_load_adapter(path) for path in adapters[start:start + _BATCH_ROWS]]
        columns = {}
        for module in modules:
            columns[module.down] = matrix_column(np.stack([a.matrices[module.name][0] for a in batch]))
            columns[module.up] = matrix_column(np.stack([a.matrices[module.name][1] for a in batch]))
        columns["category_label"] = pa.array([DIGITS[a.label] for a in batch])
        columns["category_name"] = pa.array([f"handwritten {DIGITS[a.label]}" for a in batch])
        columns["num_images"] = pa.array([a.num_images for a in batch], pa.int64())
        columns["rank"] = pa.array([rank] * len(batch), pa.int64())
        yield pa.table(columns)


def _summary(config: ZooConfig, adapters: list[Path], base_summary: dict, seconds: float) -> dict:
    import diffusers
    import peft
    import torch

    meta = [_adapter_meta(path) for path in adapters]  # the tensors were read once, by _tables
    return {
        "format": "lora-ws", "zoo_version": ZOO_VERSION, "config": asdict(config), "unet": UNET, "base": base_summary,
        "recipe": {"lora": {"r": config.rank, "lora_alpha": config.rank, "init_lora_weights": "gaussian",
                            "target_modules": ["to_q", "to_v"]}, "optimizer": "AdamW", "lr": config.lr,
                   "steps": config.steps, "batch": "all of the adapter's images (4-16)", "loss": "DDPM noise MSE"},
        "adapters": {key: [m[key] for m in meta] for key in ("label", "num_images", "loss_before", "loss_after", "seconds")},
        "build_seconds_this_run": seconds,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }


def build_zoo(out: str | Path, config: ZooConfig = ZooConfig(), workers: int | None = None, scheduler: str | None = None,
              cache_dir: str | Path | None = None, progress=None) -> Path:
    """Write the zoo to ``out`` (a save_to_disk DatasetDict with one ``train`` split); resumes an interrupted build.

    ``progress(stage, total)`` returns a callable taking the number of steps done (stage: "base", "adapters").
    """
    _require_packages()
    if config.n < 1 or config.rank < 1 or config.steps < 0 or not 1 <= config.min_images <= config.max_images:
        raise PipelineError("--n and --rank must be at least 1, --steps at least 0, and 1 <= min images <= max images")
    smallest = min(len(rows) for rows in digits().adapter_rows)
    if config.max_images > smallest:
        raise PipelineError(f"at most {smallest} images per adapter: the smallest digit class has that many")
    out = Path(out)
    if out.exists():
        raise PipelineError(f"{out} already exists; choose another --out or remove it")
    started = time.perf_counter()
    cache_dir = Path(cache_dir or builtin_home() / "zoo-base")
    work = _work_folder(out, config)
    base, base_summary = base_model(config, cache_dir, progress("base", config.base_steps) if progress else None)
    folder = work / "adapters"
    todo = [i for i in range(config.n) if not (folder / f"{i:06d}.safetensors").exists()]
    if todo:
        tick = progress("adapters", config.n) if progress else None
        if tick:
            tick(config.n - len(todo))
        _train_all(todo, config, base, folder, workers, scheduler, tick)
    adapters = [folder / f"{i:06d}.safetensors" for i in range(config.n)]
    first = _load_adapter(adapters[0])
    modules = [LoraModule(name, down.shape[1], up.shape[0]) for name, (down, up) in first.matrices.items()]
    summary = _summary(config, adapters, base_summary, time.perf_counter() - started)
    write_dataset(out, _tables(adapters, modules, config.rank), -(-config.n // _BATCH_ROWS), _BATCH_ROWS, modules,
                  config.rank, f"zoo-digits-v{ZOO_VERSION}-{config.digest()}",
                  extra_files={"zoo.json": json.dumps(summary, indent=1)})
    shutil.rmtree(work)
    return out


# --- zoo:digits as a source -----------------------------------------------------------------------------


def parse_uri(uri: str) -> ZooConfig:
    """``zoo:digits`` or ``zoo:digits?n=50&steps=100`` -> its config (fields of ZooConfig)."""
    name, _, query = uri.removeprefix("zoo:").partition("?")
    if name != "digits":
        raise PipelineError(f"unknown zoo {uri!r}; the one there is: zoo:digits (options: zoo:digits?n=500&steps=200&seed=0)")
    fields = ZooConfig.__dataclass_fields__
    values = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in fields:
            raise PipelineError(f"unknown option {key!r} in {uri!r}; known: {', '.join(fields)}")
        try:
            values[key] = type(getattr(ZooConfig(), key))(value)
        except ValueError:
            raise PipelineError(f"option {key!r} in {uri!r} must be a number, not {value!r}") from None
    return ZooConfig(**values)


def builtin_zoo(uri: str, progress=None) -> Path:
    """The zoo named by ``uri``, built under ``stores/builtin/`` (or $PIPELINE_BUILTIN_HOME) on first use."""
    config = parse_uri(uri)
    path = builtin_home() / f"zoo-digits-v{ZOO_VERSION}-n{config.n}-r{config.rank}-s{config.seed}-{config.digest()[:8]}"
    if not path.exists():
        build_zoo(path, config, progress=progress)
    return path
