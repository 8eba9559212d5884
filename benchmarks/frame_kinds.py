"""Where an evaluation's Det. scores come from: its saved 5-frame images re-scored by the world's
exact detector, split by frame kind (a pronoun in the referential caption, or not) and by how
many characters each frame shows.

Why: on the world, Det. BG-Acc falls as more characters are drawn, so a row that draws nobody
on the pronoun frames (the Char-LDM on referential captions) reads its settings more easily there.
On the named frames every row reads the same caption, and the rows can be compared as they stand.

``python -m benchmarks.frame_kinds --evaluation WORK/evaluation/<run> [--config configs/world.yaml]``
(the world's root is read from the config's ``data.root`` under the evaluation's work dir). Last
line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROWS = ("char_ldm-original", "char_ldm-referential", "storygpt-original", "storygpt-referential")


def _acc(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


def rescore(frames_dir: Path, truth: dict) -> dict:
    """``truth``: (story id, frame index) -> the frame (characters, setting, captions)."""
    import numpy as np
    from PIL import Image

    from storygpt.world.detector import detect

    rows, by_cast = {}, defaultdict(list)
    for row in ROWS:
        kinds: dict[str, dict[str, list[bool]]] = {k: {"char": [], "bg": []} for k in ("pronoun", "named")}
        for path in sorted((frames_dir / row / "5").glob("*.png")):
            story, index = path.stem.rsplit("_", 1)
            frame = truth[(story, int(index))]
            kind = "pronoun" if frame.referential_caption != frame.caption else "named"
            found = detect(np.asarray(Image.open(path).convert("RGB")))
            kinds[kind]["char"].append(sorted(found.characters) == sorted(frame.characters))
            kinds[kind]["bg"].append(found.setting == frame.setting)
            by_cast[min(len(found.characters), 3)].append(found.setting == frame.setting)
        rows[row] = {f"det_{m}_acc_{k}": _acc(v[m]) for k, v in kinds.items() for m in ("char", "bg")}
        rows[row].update({f"{k}_frames": len(v["char"]) for k, v in kinds.items()})
    return {"rows": rows, "det_bg_acc_by_characters_drawn": {
        ("3+" if n == 3 else str(n)): {"det_bg_acc": _acc(hits), "frames": len(hits)} for n, hits in sorted(by_cast.items())}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluation", required=True, help="an evaluation's output dir (holds frames/, scores.json)")
    parser.add_argument("--config", default="configs/world.yaml")
    args = parser.parse_args(argv)

    from benchmarks.common import emit
    from storygpt.config import load_config
    from storygpt.data.characters import get_table
    from storygpt.data.readers import ReadOptions, read_stories

    evaluation = Path(args.evaluation)
    scores = json.loads((evaluation / "scores.json").read_text())
    work = evaluation.parent.parent  # {work_dir}/evaluation/<run>
    cfg = load_config(args.config, [f"work_dir={work}"])
    options = ReadOptions(scores.get("split", "test"), referential_rule=scores.get("referential_rule", "equal"),
                          check_files=False)
    stories, _ = read_stories(cfg.data.format, cfg.path(cfg.data.root), get_table(cfg.data.dataset), options)
    truth = {(s.story_id, k): f for s in stories for k, f in enumerate(s.frames)}
    result = {"benchmark": "frame_kinds", "evaluation": str(evaluation), **rescore(evaluation / "frames", truth)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
