"""What every benchmark prints beside its figures: the machine it ran on."""

from __future__ import annotations

import json
import os
import platform


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(result: dict) -> None:
    """The contract: the last line of output is one JSON object."""
    print(json.dumps({**result, "machine": machine()}), flush=True)
