"""One progress bar per long step: layers done, MB/s and ETA, on stderr; silent when quiet."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class LayerProgress:
    """A bar over layers that also shows the throughput in MB/s."""

    def __init__(self, total_layers: int, total_bytes: int, description: str = "materialize", quiet: bool = False,
                 unit: str = "layer"):
        self._bar = tqdm(total=total_layers, unit=unit, desc=description, disable=quiet or total_layers == 0,
                         file=sys.stderr, dynamic_ncols=True)
        self._bytes = 0
        self._total_bytes = total_bytes
        self._started = time.perf_counter()

    def note(self, text: str) -> None:
        """Say where the step is within the current unit (train: the configuration, its runs and epoch)."""
        self._bar.set_postfix_str(text)

    def update(self, layers: int, nbytes: int) -> None:
        if not nbytes and not self._total_bytes:  # a bar of work without bytes (train's configurations): no MB/s
            self._bar.update(layers)
            return
        self._bytes += nbytes
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        total = f"/{self._total_bytes / 1e6:.0f}" if self._total_bytes else ""
        self._bar.set_postfix_str(f"{self._bytes / 1e6 / elapsed:.0f} MB/s, {self._bytes / 1e6:.0f}{total} MB", refresh=False)
        self._bar.update(layers)

    def close(self) -> None:
        self._bar.close()


def factory(description: str, quiet: bool, unit: str = "layer"):
    """A ``progress`` callable for the stages: progress(total_layers=..., total_bytes=..., unit=None) -> bar."""
    default_unit = unit
    def make(total_layers: int, total_bytes: int, unit: str | None = None) -> LayerProgress:
        return LayerProgress(total_layers, total_bytes, description, quiet, unit or default_unit)
    return make
