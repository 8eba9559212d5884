"""`make bench`: run every benchmark module, collect each one's last-line JSON into
benchmarks/results/<date>-<host>.json, and write its Markdown summary beside it (.md).
Pass --quick through for a short run."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from benchmarks.report import render

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__", "common", "flops", "report", "run_all",
                  "world_learning"}  # a learning study (20 min on 2 cores): run it by hand


def main() -> int:
    quick = ["--quick"] if "--quick" in sys.argv else []
    results, failed = {}, []
    for module in sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS):
        print(f"== benchmarks.{module}", flush=True)
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *quick],
                              cwd=HERE.parent, capture_output=True, text=True)
        # The JSON line is the last one a benchmark prints, but Ray may log after it.
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        try:
            results[module] = json.loads(lines[-1])
            print(lines[-1], flush=True)
        except (IndexError, json.JSONDecodeError):
            failed.append(module)
            print(proc.stderr[-2000:], file=sys.stderr)
    out = HERE / "results" / f"{datetime.date.today()}-{platform.node()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    summary = out.with_suffix(".md")
    summary.write_text(render(results, f"Benchmarks {out.stem}" + (" (--quick)" if quick else "")))
    print(f"wrote {out} and {summary}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
