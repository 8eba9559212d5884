"""FLOPs and model FLOP utilisation (MFU) of a train step.

A step's FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts while it runs
(forward, backward and anything else the step calls): the matmul-class ops (mm, bmm, addmm,
convolutions, the fused attention kernels, forward and backward), 2 FLOPs per multiply-add.
Elementwise work (norms, activations, the optimiser's update) is not counted, as MFU usually
reckons. No FLOP formula is written here: the counter is the one source.

On CPU the fused SDPA kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) has no entry
in the counter's registry (torch 2.13): counted as it runs, attention would be 0 FLOPs. So on CPU
the count runs SDPA's math backend, whose matmuls the counter sees; the CUDA kernels (flash,
efficient, cuDNN) are in the registry and are counted as they run.

This lives in ``benchmarks/``: MFU is a figure the benchmarks report, nothing the library or the
jobs compute.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

# Dense (no 2:4 sparsity) bf16 tensor-core peak with fp32 accumulation, TFLOP/s, from the vendors'
# datasheets, matched as substrings of torch.cuda.get_device_name() in this order (the specific
# names before "H100" and "A10G" before "A10").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),  # the H100 SXM's compute, more memory
    ("A100", 312.0),
    ("A10G", 125.0),  # AWS's A10 variant: the A10 datasheet's figure (its clocks may give it less)
    ("L4", 121.0),
    ("RTX 4090", 165.2),  # GeForce: fp32 accumulation runs at half the fp16-accumulate rate
)
NO_CPU_PEAK = ("no trustworthy peak for a CPU (it depends on the ISA, the cores' clocks under load "
               "and what else runs): pass --peak-tflops to get an MFU")


def peak_tflops(device_name: str | None) -> float | None:
    """The table's dense bf16 peak for a ``torch.cuda.get_device_name()``, or None if unknown."""
    if device_name:
        for key, tflops in PEAK_BF16_TFLOPS:
            if key.lower() in device_name.lower():
                return tflops
    return None


def device_peak(device: str, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for ``device`` ("cpu" or "cuda"); ``override`` (the
    ``--peak-tflops`` flag) wins. None with the reason where there is no peak to judge against."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops: expected a positive TFLOP/s figure, got {override}")
        return override, "--peak-tflops"
    if device == "cpu":
        return None, NO_CPU_PEAK
    import torch

    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    if peak is None:
        return None, f"'{name}' is not in benchmarks.flops.PEAK_BF16_TFLOPS: pass --peak-tflops"
    return peak, f"dense bf16 peak of '{name}' (benchmarks.flops.PEAK_BF16_TFLOPS)"


def count_flops(step: Callable[[], object], device: str = "cpu", by_module: bool = False) -> int | dict[str, int]:
    """FLOPs of one ``step()`` call (run once, for real: it changes what it trains). With
    ``by_module``: {module path: FLOPs} for every module the counter saw ("Global": the total).
    The per-module split of the backward is not reliable in torch 2.13 (backward ops land on
    modules fed from outside their block, e.g. ``attn2.to_k`` on the conditioning); the total is."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    math_attention = sdpa_kernel(SDPBackend.MATH) if device == "cpu" else contextlib.nullcontext()
    with math_attention, FlopCounterMode(display=False) as counter:
        step()
    if device != "cpu":
        torch.cuda.synchronize()
    if by_module:
        return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops()


def utilisation(flops: int, seconds: float, peak: float | None) -> dict:
    """Achieved TFLOP/s of ``flops`` done in ``seconds``, and MFU = achieved / ``peak`` (TFLOP/s;
    None: no MFU)."""
    if seconds <= 0:
        raise ValueError(f"seconds per step must be positive, got {seconds}")
    achieved = flops / seconds / 1e12
    return {"tflops_per_s": _figures(achieved), "mfu": None if peak is None else _figures(achieved / peak)}


def _figures(x: float) -> float:
    return float(f"{x:.4g}")  # 4 significant figures: a CPU's TFLOP/s is a small number


def step_report(flops: int, seconds: float, peak: float | None, peak_source: str) -> dict:
    """The figures every MFU benchmark prints for one kind of step."""
    return {"gflops_per_step": round(flops / 1e9, 3), "s_per_step": round(seconds, 4),
            **utilisation(flops, seconds, peak), "peak_tflops": peak, "peak_source": peak_source}


# ----------------------------------------------------------------------------- timing the options
PAYS = 1.03  # an option "pays" when it is this much faster than without it (beyond run-to-run noise)


def median_step_times(step, switch, warmup: int, steps: int, sync=lambda: None) -> dict[bool, float]:
    """Median seconds of ``step()`` with ``switch(True)`` and ``switch(False)``, interleaved so
    drift (other processes, clocks) hits both alike; the first ``warmup`` rounds are not timed."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(warmup + steps):
        for on in (True, False):
            switch(on)
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[on].append(time.perf_counter() - start)
    return {on: statistics.median(t) for on, t in times.items()}


def adamw_variants(params: list, lr: float, weight_decay: float, knobs: dict) -> Callable:
    """A getter of the AdamW over ``params`` that ``knobs`` asks for: ``fused_adamw`` (fused kernel,
    else the default foreach) and, where present, ``channels_last``. Each variant is made on first
    use and keeps its own state, in the memory format of the weights it steps."""
    import torch

    made: dict = {}

    def optimiser() -> torch.optim.Optimizer:
        key = (knobs["fused_adamw"], knobs.get("channels_last", False))
        if key not in made:
            made[key] = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=key[0] or None)
        return made[key]

    return optimiser


def compare_options(step, switches: dict, baseline: dict[str, bool], flops: int, peak: float | None,
                    warmup: int, steps: int, sync=lambda: None) -> dict:
    """Each option on vs off (the rest at ``baseline``, what the jobs run), then every option that
    paid switched to its faster side at once ("combined") against the baseline. ``speedup`` =
    seconds off ÷ seconds on; "baseline": the median of the pairs' baseline sides."""
    out: dict = {}
    baseline_times = []  # the baseline's median from each pair: the job's step
    for name, switch in switches.items():
        t = median_step_times(step, switch, warmup, steps, sync)
        switch(baseline[name])
        baseline_times.append(t[baseline[name]])
        out[name] = {"speedup": round(t[False] / t[True], 3),
                     "on": {"s_per_step": round(t[True], 4), **utilisation(flops, t[True], peak)},
                     "off": {"s_per_step": round(t[False], 4), **utilisation(flops, t[False], peak)}}
        print(f"{name}: {out[name]}", flush=True)  # a long run killed later keeps what it measured
    if not switches:
        baseline_times = list(median_step_times(step, lambda on: None, warmup, steps, sync).values())
    seconds = statistics.median(baseline_times)
    out["baseline"] = {"s_per_step": round(seconds, 4), **utilisation(flops, seconds, peak)}
    best = {name: out[name]["speedup"] >= 1 for name in switches
            if max(out[name]["speedup"], 1 / out[name]["speedup"]) >= PAYS}
    changed = {name: on for name, on in best.items() if on != baseline[name]}
    if changed:
        def combined(on: bool) -> None:
            for name, side in changed.items():
                switches[name](side if on else baseline[name])

        t = median_step_times(step, combined, warmup, steps, sync)
        combined(False)
        out["combined"] = {"options": changed, "speedup": round(t[False] / t[True], 3),
                           "on": {"s_per_step": round(t[True], 4), **utilisation(flops, t[True], peak)},
                           "off": {"s_per_step": round(t[False], 4), **utilisation(flops, t[False], peak)}}
    return out
