import torch

from storygpt.compat import ensure_torchvision, nms


def test_torchvision_and_the_stack_import():
    assert ensure_torchvision() in ("native", "shimmed")
    import torchvision  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from segment_anything import SamPredictor  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401


def test_nms_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 20], dim=1)
    scores = torch.rand(60, generator=g)
    keep = nms(boxes, scores, 0.4)

    def iou(a, b):
        lt, rb = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
        inter = (rb - lt).clamp(min=0).prod()
        return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)

    expected = []
    for i in scores.argsort(descending=True).tolist():
        if all(iou(boxes[i], boxes[j]) <= 0.4 for j in expected):
            expected.append(i)
    assert keep.tolist() == expected
    assert torch.ops.torchvision.nms(boxes, scores, 0.4).tolist() == expected
