"""What a store holds, as text: source, splits, modules, labels and what is complete."""

from __future__ import annotations

from . import store


def describe(path: str) -> str:
    root = store.open_root(path)
    attrs = root.attrs.asdict()
    source = attrs["source"]
    splits = attrs["splits"]
    modules = attrs["modules"]
    lines = [
        f"store    {path}  (format {attrs['format']} v{attrs['schema_version']})",
        f"source   {source['uri']}  [{source['kind']}, fingerprint {source['fingerprint'][:12]}]",
        "splits   " + ", ".join(f"{name} {info['n']}" for name, info in splits.items()),
    ]
    ranks = sorted({m["rank"] for m in modules})
    raw_bytes = 0
    done = 0
    for split, info in splits.items():
        for m in modules:
            group = f"raw/{split}/{m['key']}"
            if store.group_complete(root, group):
                done += 1
            raw_bytes += info["n"] * (m["rank"] * m["in"] + m["out"] * m["rank"]) * (2 if m["dtype"] == "float16" else 4)
    lines.append(f"layers   {2 * len(modules)} tensors in {len(modules)} modules, rank {'/'.join(map(str, ranks))}, "
                 f"{raw_bytes / 1e6:.0f} MB of weights, {attrs['chunk_models']} models per chunk")
    lines.append(f"complete {done}/{len(splits) * len(modules)} (split, module) groups")
    for name, info in attrs["labels"].items():
        extra = f" {len(info['classes'])} classes: {', '.join(info['classes'][:10])}" if "classes" in info else ""
        lines.append(f"label    {name} ({info['kind']}){extra}")
    if attrs.get("ignored_columns"):
        lines.append(f"ignored  {len(attrs['ignored_columns'])} non-LoRA column(s): {', '.join(attrs['ignored_columns'][:5])}")
    return "\n".join(lines)
