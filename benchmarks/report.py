"""The Markdown summary of one `make bench` run: per benchmark, the machine it ran on and its
figures, each ``target_X`` set beside ``X`` with whether it was met."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# how a figure compares with its target: most are "at least"; these are "at most"
AT_MOST = {"cache_growth", "lreg_overhead"}
SKIP = {"benchmark", "machine"}


def render(results: dict[str, dict], title: str) -> str:
    lines = [f"# {title}", ""]
    for name, result in results.items():
        m = result.get("machine", {})
        gpu = m.get("gpu") or "no GPU"
        lines += [f"## {name}", "",
                  f"Machine: `{m.get('host')}`, {m.get('cpus')} CPUs, {gpu}; torch {m.get('torch')}, "
                  f"Python {m.get('python')}.", "", "| figure | value | target |", "|---|---|---|"]
        flat = _flatten({k: v for k, v in result.items() if k not in SKIP})
        for key, value in flat.items():
            if key.split(".")[-1].startswith("target_"):
                continue
            lines.append(f"| {key} | {_fmt(value)} | {_target(key, value, flat)} |")
        lines.append("")
    return "\n".join(lines)


def _target(key: str, value, flat: dict) -> str:
    *parent, leaf = key.split(".")
    target = flat.get(".".join([*parent, f"target_{leaf}"]))
    if target is None or not isinstance(value, (int, float)):
        return ""
    met = value <= target if leaf in AT_MOST else value >= target
    return f"{'≤' if leaf in AT_MOST else '≥'} {target}: {'met' if met else '**not met**'}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


if __name__ == "__main__":  # python -m benchmarks.report results/X.json  -> Markdown on stdout
    path = Path(sys.argv[1])
    print(render(json.loads(path.read_text()), path.stem))
