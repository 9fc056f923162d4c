"""Helpers shared by the benchmark scripts: logging, memory figures, child-process phases.

A measured phase runs in a fresh interpreter (the script re-invoked with `--phase NAME`),
so its peak RSS (`ru_maxrss`) covers that phase alone and not, say, data generation.
On Linux a process's ru_maxrss survives exec, so a child forked straight from a big
parent would report the parent's peak; children are therefore started through /bin/sh
(which forks them from its own small address space), the parents stay small anyway
(no engine import, no data held), and each child also reports VmHWM as a cross-check.
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

_SHELL = "/bin/sh"
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


def vm_hwm_mib() -> float:
    """Peak RSS of this process's current address space (VmHWM), in MiB; a cross-check.

    Unlike ru_maxrss it starts afresh at exec, so it never includes the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return float("nan")


def io_mib() -> dict[str, float]:
    """Bytes this process has read and written through system calls so far (Linux), MiB."""
    found: dict[str, float] = {}
    try:
        with open("/proc/self/io", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("rchar", "wchar"):
                    found[f"{key}_mib"] = round(int(value) / MIB, 1)
    except (OSError, ValueError):
        pass
    return found


def machine_state() -> dict[str, Any]:
    """Load average and any other benchmark processes: timings are only as quiet as this."""
    mine = {os.getpid()}
    others = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if int(entry.name) in mine or parent in mine:
            continue
        if "python" in command and ("bench/" in command or ".db" in command):
            others.append(f"{entry.name}: {command.strip()[:120]}")
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "other_processes": others}


_SEEN: dict[str, None] = {}  # other processes noticed around any phase, in order


def other_processes_seen() -> list[str]:
    """Every competing process noticed before or after any child phase so far."""
    return list(_SEEN)


def warn_if_busy(label: str) -> dict[str, Any]:
    """Log the machine state (load, other benchmark-like processes) and return it."""
    state = machine_state()
    _SEEN.update(dict.fromkeys(state["other_processes"]))
    log(f"{label}: load average {state['loadavg_1m']}")
    for other in state["other_processes"]:
        log(f"  WARNING: another process may compete for the CPU: {other}")
    return state


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
    figures.setdefault("vm_hwm_mib", vm_hwm_mib())
    figures.setdefault("io", io_mib())
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
        if Path(_SHELL).exists():
            # The shell forks the child from its own small address space: the child's
            # ru_maxrss then starts near zero instead of at this process's peak.
            command = [_SHELL, "-c", '"$@"; exit $?', "sh", *command]
        _SEEN.update(dict.fromkeys(machine_state()["other_processes"]))
        sys.stdout.flush()
        completed = subprocess.run(command, check=False)
        _SEEN.update(dict.fromkeys(machine_state()["other_processes"]))
        if completed.returncode != 0 or not result.exists():
            raise SystemExit(f"phase {phase!r} failed (exit status {completed.returncode})")
        figures: Figures = json.loads(result.read_text(encoding="utf-8"))
        return figures


def engine_revision() -> str:
    """The repository's HEAD commit, with "+dirty" if engine/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "engine"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def emit_json(figures: Figures) -> None:
    """Print the figures as the single JSON object that ends a benchmark's output."""
    print(json.dumps(figures, ensure_ascii=False, sort_keys=False), flush=True)


def run_context(revision: str, machine_start: dict[str, object]) -> dict[str, object]:
    """The figures every benchmark reports about where and on what it ran."""
    import sqlite3

    now = engine_revision()
    return {
        "sqlite_version": sqlite3.sqlite_version,
        "engine_revision": revision
        if revision == now
        else f"{revision} then {now} (the engine changed during the run)",
        "machine_at_start": machine_start,
        "machine_at_end": warn_if_busy("at the end"),
        "other_processes_seen": other_processes_seen(),
    }
