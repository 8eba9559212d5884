"""Does stage 2 earn its place, from the real jobs' output? Reads an evaluation's ``scores.json``
(``storygpt evaluate`` or ``make demo``) and, when the work dir's MLflow holds it, the aligner run's
last reference accuracy and conditioning cosine; prints the decomposition as one JSON line and,
with ``--results DIR``, writes it beside a Markdown table.

``python -m benchmarks.stage2 --scores WORK/evaluation/<run>/scores.json [--work WORK]
[--preset world] [--command "make demo PRESET=world"] [--results benchmarks/results]``

Keys: ``storygpt_v_ratio`` (StoryGPT-V referential ÷ Char-LDM named, exact-detector Char-Acc;
the paper's Table 1 gives 0.97), ``resolution_gain`` (StoryGPT-V referential ÷ Char-LDM
referential), ``mapper_ratio`` (StoryGPT-V named ÷ Char-LDM named), the rows, the long-story
figures, and the aligner's ``reference_accuracy`` / ``reference_chance`` / ``conditioning_cosine``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

ROWS = ("char_ldm/original", "char_ldm/referential", "storygpt/original", "storygpt/referential")
ALIGNER_METRICS = ("reference_accuracy", "reference_chance", "conditioning_cosine")


def aligner_figures(work: Path) -> dict:
    """The last logged value of each aligner metric in the work dir's sqlite MLflow (newest
    aligner run), or {} where there is none."""
    db = work / "mlflow.db"
    if not db.is_file():
        return {}
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db.resolve()}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id],
                                                                                 order_by=["attributes.start_time DESC"])
            if "reference_accuracy" in r.data.metrics]  # the aligner runs
    if not runs:
        return {}
    return {k: round(v, 4) for k, v in runs[0].data.metrics.items() if k in ALIGNER_METRICS}


def table(result: dict) -> str:
    rows = result["rows"]
    lines = ["| row | Det. Char-Acc | Det. BG-Acc | FID |", "|---|---:|---:|---:|"]
    for row in ROWS:
        if row in rows:
            r = rows[row]
            lines.append(f"| {row} | {100 * r.get('det_char_acc', float('nan')):.1f} % | "
                         f"{100 * r.get('det_bg_acc', float('nan')):.1f} % | {r.get('fid', float('nan')):.1f} |")
    keys = ("storygpt_v_ratio", "resolution_gain", "mapper_ratio", *ALIGNER_METRICS)
    lines += ["", "| figure | value |", "|---|---:|", *[f"| {k} | {result.get(k)} |" for k in keys]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", required=True, help="an evaluation's scores.json")
    parser.add_argument("--work", help="the work dir (for the aligner's MLflow run)")
    parser.add_argument("--preset", default="world")
    parser.add_argument("--command", default="", help="the command that produced the scores, for the record")
    parser.add_argument("--results", help="write <date>-<host>-stage2-<preset>.{json,md} here")
    args = parser.parse_args(argv)

    from benchmarks.common import emit, machine
    from storygpt.evaluation.report import decomposition

    scores = json.loads(Path(args.scores).read_text())
    results = scores["results"]
    missing = [row for row in ("char_ldm/original", "char_ldm/referential", "storygpt/referential") if row not in results]
    if missing:
        raise SystemExit(f"--scores: {args.scores} has no row {missing} (set evaluate.rows to all four rows)")
    result = {"benchmark": "stage2", "preset": args.preset, "command": args.command, "scores": str(args.scores),
              "referential_rule": scores.get("referential_rule"), **decomposition(results),
              "rows": {row: results[row] for row in ROWS if row in results},
              "long_results": scores.get("long_results", {}),
              **(aligner_figures(Path(args.work)) if args.work else {})}
    emit(result)
    if args.results:
        out = Path(args.results)
        out.mkdir(parents=True, exist_ok=True)
        host = machine()
        stem = f"{datetime.date.today()}-{host['host'] or 'host'}-stage2-{args.preset}"
        (out / f"{stem}.json").write_text(json.dumps({**result, "machine": host}, indent=1))
        (out / f"{stem}.md").write_text(f"# Stage 2 decomposition, preset `{args.preset}`\n\n`{args.command}`\n\n"
                                        + table(result) + f"\nMachine: {host}\n")
    return result


if __name__ == "__main__":
    main()
