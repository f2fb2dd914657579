"""What every benchmark shares: percentiles, RSS sampling, tables, and the
section of docs/benchmarks.md each benchmark owns."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # bench scripts run as files; the repo root makes `tests.support` importable.
    sys.path.insert(0, str(REPO))

BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def rss_mib(pid: int) -> float:
    """Resident set size of one process in MiB."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


class RssSampler:
    """Samples the RSS of a process (and its children) in a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                total = proc.memory_info().rss
                for child in proc.children(recursive=True):
                    total += child.memory_info().rss
            except psutil.Error:
                break
            self.samples.append((time.monotonic(), total / 2**20))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        """Highest sample so far."""
        return max((s for _, s in self.samples), default=float("nan"))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats get sensible precision."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
        return str(value)

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """One line saying where and when a benchmark ran."""
    cpus = os.cpu_count()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when}; {platform.system()} {platform.machine()}, {cpus} CPUs ({model}); "
        f"Python {platform.python_version()}; 1-min load average at start {load:.2f}"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section of docs/benchmarks.md that `name` owns."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


_HEADER = """# Benchmarks

Each section below is written by the script named in it; run the script again
to refresh its section. Figures are medians and ratios measured side by side
in one run on the machine named in the section, which was otherwise idle
unless the section says so.
"""
