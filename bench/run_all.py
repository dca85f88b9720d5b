#!/usr/bin/env python
"""Run every benchmark, one after the other, and rewrite docs/benchmarks.md.

    python bench/run_all.py            # the full measurements (about 130 minutes on a 2-core CPU)
    python bench/run_all.py --quick    # tiny sizes, a smoke test (results in a temporary folder)
    python bench/run_all.py --only sampling gpu

Each benchmark waits for a quiet machine (--max_load) before it measures; --max_wait_s bounds the
waiting of the whole run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (  # noqa: E402
    bench_cache_latents, bench_compile, bench_data, bench_distill, bench_gpu, bench_guidance, bench_quality,
    bench_sampling, bench_train_step, report,
)

BENCHMARKS = {
    "cache_latents": bench_cache_latents,
    "data": bench_data,
    "train_step": bench_train_step,
    "sampling": bench_sampling,
    "compile": bench_compile,
    "gpu": bench_gpu,
    "quality": bench_quality,
    "guidance": bench_guidance,
    "distill": bench_distill,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS),
                        help="Run only these benchmarks (in the order above).")
    args = report.parse_benchmark_args(parser, argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    common = ["--results_dir", args.results_dir, "--report", args.report, "--max_load", str(args.max_load)]
    if args.quick:
        common.append("--quick")
    results = {}
    waited = 0.0
    for name in BENCHMARKS:
        if name in args.only:
            print(f"===== {name} =====", flush=True)
            # --max_wait_s bounds the waiting of the whole run, not of each benchmark.
            results[name] = BENCHMARKS[name].main(common + ["--max_wait_s", str(max(0.0, args.max_wait_s - waited))])
            waited += results[name].get("waited_for_quiet_s", 0.0)
    print(f"Report: {report.write_report(args.results_dir, args.report)}")
    return results


if __name__ == "__main__":
    main()
