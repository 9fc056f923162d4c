"""Helpers shared by the benchmark scripts: logging, memory figures, child-process phases.

A measured phase runs in a fresh interpreter (the script re-invoked with `--phase NAME`),
so its peak RSS (`ru_maxrss`) covers that phase alone and not, say, data generation.
The child writes its figures as JSON to a file the parent names; its progress lines go
to the inherited stdout, so they appear in order with the parent's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
MIB = 1024 * 1024

# The engine must be importable when a script is run as `python bench/x.py` from anywhere.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

Params = dict[str, Any]
Figures = dict[str, Any]
Phase = Callable[[Params], Figures]

# Children stamp their lines on the parent's clock (perf_counter is system-wide on Linux).
_CLOCK_ENV = "BENCH_CLOCK_START"
_START = float(os.environ.get(_CLOCK_ENV) or time.perf_counter())
os.environ[_CLOCK_ENV] = repr(_START)


def log(message: str) -> None:
    """Print one progress line, stamped with seconds since this process started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def children_peak_rss_mib() -> float:
    """The largest peak RSS of any waited-for child process, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def current_rss_mib() -> float:
    """This process's resident set size right now, in MiB (Linux /proc)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return round(resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB, 1)


def remove_db(path: Path) -> None:
    """Delete an SQLite file with its -wal, -shm and -journal companions."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def warm_file(path: Path) -> float:
    """Read a file once so the OS page cache holds it; returns the seconds it took."""
    start = time.perf_counter()
    with path.open("rb") as handle:
        while handle.read(8 * MIB):
            pass
    return time.perf_counter() - start


def add_phase_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options a script is re-invoked with to run one phase in a child."""
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--phase-params", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)


def run_phase_here(args: argparse.Namespace, phases: Mapping[str, Phase]) -> None:
    """Child side: run `args.phase` and write its figures (plus peak RSS) as JSON."""
    params: Params = json.loads(args.phase_params or "{}")
    rss_before = peak_rss_mib()
    figures = phases[args.phase](params)
    figures.setdefault("peak_rss_mib", peak_rss_mib())
    figures.setdefault("rss_before_phase_mib", rss_before)
    Path(args.result_file).write_text(json.dumps(figures), encoding="utf-8")


def run_phase_in_child(script: Path, phase: str, params: Params) -> Figures:
    """Parent side: run one phase of `script` in a fresh interpreter; return its figures."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result = Path(tmp) / "result.json"
        command = [
            sys.executable,
            str(script),
            "--phase",
            phase,
            "--phase-params",
            json.dumps(params),
            "--result-file",
            str(result),
        ]
        sys.stdout.flush()
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0 or not result.exists():
            raise SystemExit(f"phase {phase!r} failed (exit status {completed.returncode})")
        figures: Figures = json.loads(result.read_text(encoding="utf-8"))
        return figures


def emit_json(figures: Figures) -> None:
    """Print the figures as the single JSON object that ends a benchmark's output."""
    print(json.dumps(figures, ensure_ascii=False, sort_keys=False), flush=True)
