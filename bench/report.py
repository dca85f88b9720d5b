"""What every benchmark shares: the machine's description, the load, the result JSON and docs/benchmarks.md.

A benchmark script builds a result with `start_result(name, title, args)`, fills in `settings`,
`results` (numbers, for machines and tests), `tables` (for people), `targets` and `notes`, and hands
it to `finish_result`, which writes `<results_dir>/<name>.json` and regenerates the Markdown report
from every result JSON in that folder. `python bench/report.py` regenerates the report alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_REPORT = REPO_ROOT / "docs" / "benchmarks.md"
# --quick runs are smoke tests: by default they stay out of the committed results and report.
QUICK_RESULTS_DIR = Path(tempfile.gettempdir()) / "uldm-bench-quick" / "results"
QUICK_REPORT = Path(tempfile.gettempdir()) / "uldm-bench-quick" / "benchmarks.md"
# Order of the sections in the report; results with other names follow alphabetically.
SECTION_ORDER = ("cache_latents", "data", "train_step", "sampling", "compile", "gpu", "quality", "guidance", "distill")

REPORT_HEADER = """# Benchmarks

Measured with the scripts in `bench/` (`python bench/run_all.py` runs them all and rewrites this
file from `bench/results/*.json`; each `bench/bench_*.py` also runs alone, `--help` lists its
options). The speed and memory benchmarks time models with random weights (speed and memory do
not depend on the weights' values); the quality benchmark trains its models and scores their samples.
The load average is that of the whole machine when the measurement started and ended; on a shared
machine other processes slow the figures down, so read them with the load in mind.
Figures measured without a benchmark script (the quick start, the post-hoc EMA sweep, DreamBooth's
trade-off, face alignment) and the prediction type behind each figure are at the end, under
[Measured by hand](#measured-by-hand).
"""
# Everything from this line on has no result JSON: rewriting the report keeps it as it is.
HAND_MEASURED_MARKER = "<!-- Measured by hand: bench/report.py keeps everything from this line on. -->"


# --------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def proc_kib(path: str, key: str) -> int | None:
    """A "key: value kB" entry of a /proc file (e.g. /proc/meminfo's MemTotal, /proc/self/status's VmHWM) in
    KiB; None where there is no such file or entry."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def meminfo_gib(key: str) -> float | None:
    kib = proc_kib("/proc/meminfo", key)
    return None if kib is None else round(kib / 2**20, 1)


def machine_info() -> dict[str, Any]:
    import diffusers
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": meminfo_gib("MemTotal"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": device,
    }


def describe_machine(machine: dict[str, Any]) -> str:
    return (f"{machine['cpu_model']}, {machine['cpu_cores']} cores, {machine.get('memory_gib')} GiB RAM; "
            f"device {machine['device']}; torch {machine['torch']}, diffusers {machine['diffusers']}, "
            f"Python {machine['python']}, {machine['torch_threads']} torch threads")


# ------------------------------------------------------------------------------------- the load


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages (all zero where /proc/loadavg does not exist)."""
    try:
        return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return [0.0, 0.0, 0.0]


def wait_for_quiet_machine(max_load: float, max_wait_s: float, poll_s: float = 20.0,
                           log: Callable[[str], None] = print) -> float:
    """Sleep until the 1-minute load is at most max_load, or max_wait_s has passed; returns seconds waited.

    The machine is shared: measuring while others compute would report their load, not our speed.
    """
    start = time.monotonic()
    load = load_average()[0]
    if load <= max_load or max_wait_s <= 0:
        return 0.0
    log(f"Load {load:.2f} > {max_load}: waiting up to {max_wait_s:.0f} s for a quieter moment...")
    while load > max_load and time.monotonic() - start < max_wait_s:
        time.sleep(min(poll_s, max(0.0, max_wait_s - (time.monotonic() - start))))
        load = load_average()[0]
    waited = time.monotonic() - start
    if load > max_load:
        log(f"The load is still {load:.2f} after {waited:.0f} s: measuring anyway (the load is recorded).")
    else:
        log(f"Load {load:.2f} after waiting {waited:.0f} s: measuring.")
    return waited


# ---------------------------------------------------------------------------------- measuring


class CallTimer:
    """Accumulates the wall time spent in calls of a function (wrap it with `timer.wrap(fn)`)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


@contextlib.contextmanager
def timing_calls(owner: Any, attribute: str) -> Iterator[CallTimer]:
    """Time every call of `owner.attribute` (a module function or an instance's method) while inside."""
    timer = CallTimer()
    original = getattr(owner, attribute)
    setattr(owner, attribute, timer.wrap(original))
    try:
        yield timer
    finally:
        setattr(owner, attribute, original)


@contextlib.contextmanager
def quick_mode_threads(args: argparse.Namespace) -> Iterator[None]:
    """One torch thread in --quick mode: tiny models gain nothing from more, and on a busy machine
    threads that wait for each other make them many times slower. Restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    if args.quick:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (a no-op on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ command line


def add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark run")
    group.add_argument("--quick", action="store_true",
                       help="Tiny sizes that finish in seconds (a smoke test, not a measurement).")
    group.add_argument("--results_dir", type=str, default=None,
                       help=f"Where <name>.json is written (default {DEFAULT_RESULTS_DIR.relative_to(REPO_ROOT)}; "
                            f"with --quick {QUICK_RESULTS_DIR}).")
    group.add_argument("--report", type=str, default=None,
                       help=f"The Markdown report regenerated from every JSON in --results_dir (default "
                            f"{DEFAULT_REPORT.relative_to(REPO_ROOT)}; with --quick {QUICK_REPORT}).")
    group.add_argument("--max_load", type=float, default=1.0,
                       help="Wait until the 1-minute load average is at most this before measuring.")
    group.add_argument("--max_wait_s", type=float, default=1200.0,
                       help="Give up waiting for a quiet machine after this many seconds (then measure anyway).")


def resolve_output_paths(args: argparse.Namespace) -> None:
    """Fill in --results_dir and --report: the committed ones, or a temporary place for --quick."""
    if args.results_dir is None:
        args.results_dir = str(QUICK_RESULTS_DIR if args.quick else DEFAULT_RESULTS_DIR)
    if args.report is None:
        args.report = str(QUICK_REPORT if args.quick else DEFAULT_REPORT)


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                         defaults: dict[str, tuple[Any, Any]] | None = None) -> argparse.Namespace:
    """Parse a benchmark's options plus the common ones; an option left unset takes its (full, quick) default."""
    add_common_args(parser)
    args = parser.parse_args(argv)
    resolve_output_paths(args)
    for name, (full, quick) in (defaults or {}).items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def start_result(name: str, title: str, args: argparse.Namespace, wait: bool = True) -> dict[str, Any]:
    """A new result record; waits for a quiet machine first (unless wait=False or --quick)."""
    waited = wait_for_quiet_machine(args.max_load, args.max_wait_s) if wait and not args.quick else 0.0
    return {
        "name": name,
        "title": title,
        "quick": bool(args.quick),
        "machine": machine_info(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_at_start": load_average(),
        "waited_for_quiet_s": round(waited, 1),
        "memory_available_gib_at_start": meminfo_gib("MemAvailable"),
        "_start_time": time.monotonic(),
        "settings": {},
        "results": {},
        "tables": [],
        "targets": [],
        "notes": [],
    }


def add_table(result: dict, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    result["tables"].append({"title": title, "columns": list(columns), "rows": [list(row) for row in rows]})


def add_target(result: dict, target: str, measured: str, met: bool | None) -> None:
    """met=None: the target could not be judged with these settings (the reason goes in `measured`)."""
    result["targets"].append({"target": target, "measured": measured, "met": met})
    verdict = {True: "MET", False: "NOT MET", None: "not judged"}[met]
    print(f"Target: {target} -- {verdict} ({measured})", flush=True)


def finish_result(result: dict, args: argparse.Namespace) -> Path:
    """Write <results_dir>/<name>.json, regenerate the report, print the tables; returns the JSON path."""
    result["duration_s"] = round(time.monotonic() - result.pop("_start_time"), 1)
    result["load_at_end"] = load_average()
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result['name']}.json"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temporary, path)
    write_report(results_dir, args.report)
    print(render_result(result), flush=True)
    print(f"Wrote {path} and {args.report}", flush=True)
    return path


# ------------------------------------------------------------------------------------ Markdown


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, float):
        magnitude = abs(value)
        if magnitude == 0:
            return "0"
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value).replace("|", "\\|")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_value(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def render_result(result: dict) -> str:
    load_start = ", ".join(f"{value:.2f}" for value in result["load_at_start"])
    load_end = ", ".join(f"{value:.2f}" for value in result.get("load_at_end", []))
    parts = [f"## {result['title']}"]
    if result.get("quick"):
        parts.append("**Quick mode: tiny sizes, a smoke test — these are not measurements.**")
    parts.append(
        f"Machine: {describe_machine(result['machine'])}.  \n"
        f"Run {result['started']}, {result.get('duration_s', 0):.0f} s; load average (1, 5, 15 min) "
        f"{load_start} at the start, {load_end} at the end"
        + (f" (waited {result['waited_for_quiet_s']:.0f} s for a quieter machine)" if result.get("waited_for_quiet_s") else "")
        + "."
    )
    for table in result["tables"]:
        parts.append(f"**{table['title']}**\n\n" + markdown_table(table["columns"], table["rows"]))
    if result["targets"]:
        rows = [[t["target"], t["measured"], {True: "**met**", False: "**not met**", None: "not judged"}[t["met"]]]
                for t in result["targets"]]
        parts.append("**Targets**\n\n" + markdown_table(["target", "measured", "verdict"], rows))
    if result["notes"]:
        parts.append("\n".join(f"- {note}" for note in result["notes"]))
    return "\n\n".join(parts) + "\n"


def load_results(results_dir: str | os.PathLike) -> list[dict]:
    results = [json.loads(path.read_text()) for path in sorted(Path(results_dir).glob("*.json"))]
    order = {name: position for position, name in enumerate(SECTION_ORDER)}
    return sorted(results, key=lambda r: (order.get(r.get("name"), len(order)), r.get("name", "")))


def write_report(results_dir: str | os.PathLike, report: str | os.PathLike) -> Path:
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    sections = [render_result(result) for result in load_results(results_dir)]
    report.write_text(REPORT_HEADER + "\n" + "\n".join(sections) + hand_measured_part(report))
    return report


def hand_measured_part(report: Path) -> str:
    text = report.read_text() if report.is_file() else ""
    start = text.find(HAND_MEASURED_MARKER)
    return "" if start < 0 else "\n" + text[start:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the Markdown report from the result JSONs.")
    parser.add_argument("--results_dir", type=str, default=str(DEFAULT_RESULTS_DIR))
    parser.add_argument("--report", type=str, default=str(DEFAULT_REPORT))
    args = parser.parse_args(argv)
    print(f"Wrote {write_report(args.results_dir, args.report)}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
