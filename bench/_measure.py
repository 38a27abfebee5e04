"""Run a command in a subprocess and measure it: wall time, peak memory, bytes through read/write.

Linux only (/proc). Memory is sampled every 20 ms: RssAnon (what the process allocated, the number a
memory budget is about) and VmRSS (also counting pages of memory-mapped files such as Arrow datasets,
which the kernel can drop at will). I/O is the process's /proc/<pid>/io at its last sample: rchar and
wchar (bytes through read/write system calls, page cache hits included; memory-mapped reads are not
in them) and read_bytes/write_bytes (what reached the block device).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Measured:
    seconds: float = 0.0
    peak: dict = field(default_factory=dict)  # RssAnon, VmRSS in bytes
    io: dict = field(default_factory=dict)  # rchar, wchar, read_bytes, write_bytes
    output: str = ""
    timed_out: bool = False  # stopped at its timeout (run_measured's ``timeout``)


def _read_proc(pid: int) -> tuple[dict, dict]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    memory = {}
    for line in status:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            memory[key] = int(value.split()[0]) * 1024
    io = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("rchar", "wchar", "read_bytes", "write_bytes"):
            io[key] = int(value)
    return memory, io


def _sample(pid: int, result: Measured, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            memory, io = _read_proc(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return
        for key, value in memory.items():
            result.peak[key] = max(result.peak.get(key, 0), value)
        result.io.update(io)
        time.sleep(0.02)


def run_measured(command: list[str], cwd: Path, capture: bool = False, timeout: float | None = None) -> Measured:
    """Run ``command``; raise SystemExit with its output if it fails.

    ``timeout``: the command runs in a process group of its own, killed (SIGKILL, with its dask workers)
    after that many seconds; the result then says ``timed_out`` instead of raising.
    """
    result = Measured()
    stop = threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE if capture else None,
                               stderr=subprocess.STDOUT if capture else None, text=True,
                               start_new_session=timeout is not None)
    sampler = threading.Thread(target=_sample, args=(process.pid, result, stop), daemon=True)
    sampler.start()
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        result.timed_out = True
    except BaseException:  # Ctrl-C here: a group of its own would outlive us
        if timeout is not None:
            os.killpg(process.pid, signal.SIGKILL)
        raise
    result.seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    result.output = out or ""
    if process.returncode and not result.timed_out:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}\n{result.output[-2000:]}")
    return result
