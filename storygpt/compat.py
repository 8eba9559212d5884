"""The one place that papers over an environment problem: torchvision on a CPU-only torch.

PyPI's torchvision 0.28.0 wheel is CUDA-linked. On the CPU torch wheel its C extension does
not load, and ``torchvision/_meta_registrations.py`` then fails at import on two unguarded
``register_fake("torchvision::nms" / "qnms")`` decorators, which breaks every import that
probes torchvision (transformers' CLIP, diffusers' UNet, segment_anything).

:func:`ensure_torchvision` runs before torchvision is imported (``import storygpt`` calls it).
If the extension loads, it does nothing (a CUDA box). Otherwise it defines the two missing
operator schemas with a pure-torch NMS kernel, so imports succeed and
``torch.ops.torchvision.nms`` computes the right answer. torchvision's other C ops (roi_align,
deform_conv, jpeg codecs) stay unavailable; nothing in this project uses them.

``storygpt.compat.check()`` (run by ``make setup``) imports the whole stack.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_STATE: dict[str, object] = {}


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    candidates = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(
        Path(spec.origin).parent.glob("_C*.pyd")
    )
    return candidates[0] if candidates else None


def nms(boxes, scores, iou_threshold: float):
    """Greedy non-maximum suppression in pure torch; boxes (N, 4) as x0, y0, x1, y1."""
    import torch

    order = scores.argsort(descending=True)
    boxes = boxes[order].float()
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[i + 1 :, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[i + 1 :, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (area[i] + area[i + 1 :] - inter).clamp(min=1e-12)
        suppressed[i + 1 :] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def ensure_torchvision() -> str:
    """Make ``import torchvision`` work; returns 'native', 'shimmed' or 'absent'."""
    if "mode" in _STATE:
        return str(_STATE["mode"])
    import torch

    path = _extension_path()
    if path is None:
        mode = "absent"
    else:
        try:
            torch.ops.load_library(str(path))
            mode = "native"
        except (OSError, RuntimeError):
            mode = "shimmed"
            if not _has_op(torch, "nms"):  # another copy of this module may have defined it
                _define_missing_ops(torch)
    _STATE["mode"] = mode
    return mode


def _has_op(torch, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _define_missing_ops(torch) -> None:
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms, "CompositeExplicitAutograd")
    lib.impl("qnms", lambda d, s, t: nms(d.dequantize(), s.dequantize(), t), "CompositeExplicitAutograd")
    _STATE["library"] = lib  # a Library unregisters its ops when garbage-collected


def check() -> None:
    mode = ensure_torchvision()
    import diffusers  # noqa: F401
    import segment_anything  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from segment_anything import SamPredictor  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    print(f"torchvision {torchvision.__version__}: C ops {mode}; diffusers, transformers, "
          "segment_anything import cleanly")

