"""`make bench`'s Markdown summary: every figure, each target judged in its own direction."""

from __future__ import annotations

from benchmarks.report import render

MACHINE = {"host": "vm", "cpus": 2, "python": "3.11.7", "torch": "2.13.0+cpu", "gpu": None}


def test_summary_lists_figures_and_judges_targets_both_ways():
    results = {
        "serve": {"benchmark": "serve", "batching_gain": 1.08, "target_batching_gain": 2, "machine": MACHINE},
        "story": {"benchmark": "story", "cache_growth": 1.11, "target_cache_growth": 1.3,
                  "rss": {"start_mib": 633.5}, "machine": {**MACHINE, "gpu": "NVIDIA H200"}},
    }
    text = render(results, "Benchmarks test")
    assert "| batching_gain | 1.08 | ≥ 2: **not met** |" in text  # at least: 1.08 < 2
    assert "| cache_growth | 1.11 | ≤ 1.3: met |" in text  # at most: growth must stay small
    assert "| rss.start_mib | 633.5 |  |" in text
    assert not [line for line in text.splitlines() if line.startswith("| target_")]  # beside their figure
    assert "2 CPUs, no GPU" in text and "NVIDIA H200" in text
