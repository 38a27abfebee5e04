"""Recognise LoRA weight columns across naming schemes and pair each down (A) with its up (B)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PipelineError

# Each pattern names the module and whether the tensor is the down (A, shape (r, in)) or the
# up (B, shape (out, r)) matrix. Order matters: the processor scheme must win over the others.
_SCHEMES: tuple[tuple[str, re.Pattern], ...] = (
    # old diffusers attention processors: ...attn1.processor.to_k_lora.down.weight
    ("processor", re.compile(r"^(?P<pre>.+)\.processor\.(?P<proj>to_\w+?)_lora\.(?P<role>down|up)\.weight$")),
    # diffusers: ...attn1.to_q.lora.down.weight
    ("diffusers", re.compile(r"^(?P<module>.+)\.lora\.(?P<role>down|up)\.weight$")),
    # peft: ...to_q.lora_A.weight or ...to_q.lora_A.default.weight
    ("peft", re.compile(r"^(?P<module>.+)\.lora_(?P<role>A|B)(?:\.[^.]+)?\.weight$")),
    # kohya: lora_unet_..._to_q.lora_down.weight, or ..._to_q_lora_down.weight as some tools write it
    ("kohya", re.compile(r"^(?P<module>.+?)[._]lora_(?P<role>down|up)\.weight$")),
    # cloneofsimo index style: unet:12:down
    ("index", re.compile(r"^(?P<module>[^:]+:\d+):(?P<role>down|up)$")),
)
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_ROLE = {"down": "A", "A": "A", "up": "B", "B": "B"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Module:
    """One LoRA module: the down (A: (r, in)) and up (B: (out, r)) columns of one projection."""

    name: str  # canonical module name, e.g. unet.down_blocks.0....attn1.to_q
    key: str  # safe, stable Zarr node name for the module
    scheme: str
    down: str  # source column of A
    up: str  # source column of B
    alpha: str | None = None  # source column of the scalar alpha, when the format has one


def parse_lora_column(column: str) -> tuple[str, str, str] | None:
    """Return (scheme, module name, 'A' or 'B') for a LoRA weight column name, else None."""
    for scheme, pattern in _SCHEMES:
        match = pattern.match(column)
        if match is None:
            continue
        groups = match.groupdict()
        module = groups.get("module") or f"{groups['pre']}.{groups['proj']}"
        return scheme, module, _ROLE[groups["role"]]
    return None


def safe_key(name: str) -> str:
    """A Zarr node name that cannot escape its parent: [A-Za-z0-9._-] only, no dot-only names."""
    key = _UNSAFE.sub("_", name).lstrip(".")
    if not key or set(key) <= {"."}:
        key = "_"
    if key.startswith("__"):  # zarr reserves names starting with "__"
        key = "m" + key
    return key


def pair_modules(columns: list[str]) -> tuple[list[Module], list[str]]:
    """Pair the LoRA columns among ``columns``; return (modules sorted by name, alpha columns used).

    Raises PipelineError for a down without its up (or the reverse) and for a name seen twice.
    """
    found: dict[str, dict[str, str]] = {}
    schemes: dict[str, str] = {}
    for column in columns:
        parsed = parse_lora_column(column)
        if parsed is None:
            continue
        scheme, module, role = parsed
        slot = found.setdefault(module, {})
        if role in slot:
            raise PipelineError(f"module {module!r} has two {role} columns: {slot[role]!r} and {column!r}; rename one")
        slot[role] = column
        schemes[module] = scheme
    _refuse_prefix_twins(found)
    alphas = {}
    for column in columns:
        match = _ALPHA.match(column)
        if match and match["module"] in found:  # kohya: lora_unet_x.alpha beside lora_unet_x.lora_down.weight
            alphas[match["module"]] = column
    modules, used_keys = [], set()
    for name in sorted(found):
        slot = found[name]
        if set(slot) != {"A", "B"}:
            have, missing = ("down", "up") if "A" in slot else ("up", "down")
            raise PipelineError(
                f"column {next(iter(slot.values()))!r} is a LoRA {have} matrix without its {missing} matrix; "
                f"add the {missing} column or exclude the module with --modules"
            )
        key = safe_key(name)
        base, i = key, 2
        while key in used_keys:
            key, i = f"{base}-{i}", i + 1
        used_keys.add(key)
        modules.append(Module(name, key, schemes[name], slot["A"], slot["B"], alphas.get(name)))
    return modules, sorted(alphas.values())


def _refuse_prefix_twins(found: dict[str, dict[str, str]]) -> None:
    """One module named with and without the ``unet.`` prefix is one adapter layer stored twice: refuse it."""
    for name in found:
        if name.startswith("unet.") and name[len("unet."):] in found:
            twin = found[name[len("unet."):]]
            raise PipelineError(f"module {name!r} appears twice, as {next(iter(found[name].values()))!r} and {next(iter(twin.values()))!r} "
                                "(with and without the 'unet.' prefix); keep one of the two columns")


def select_modules(modules: list[Module], pattern: str | None) -> list[Module]:
    """Keep the modules whose name or either column name matches the regex ``pattern``."""
    if not pattern:
        return modules
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise PipelineError(f"--modules {pattern!r} is not a valid regular expression: {exc}") from None
    kept = [m for m in modules if regex.search(m.name) or regex.search(m.down) or regex.search(m.up)]
    if not kept:
        raise PipelineError(f"--modules {pattern!r} matches no LoRA module; run `pipeline info` on a store or check the column names")
    return kept
