"""storygpt train-classifier [--records DIR]

Fine-tunes the Inception-v3 frame classifier (characters + setting) on the records' train split,
scores it on the val split and saves it to ``evaluate.classifier.output`` (no Ray: one process,
the GPU when there is one). The last line printed is a JSON summary of the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, load_config


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--records", help="preprocessed records dir (default: preprocess.output)")
    p.add_argument("--output", help="where the classifier is saved (default: evaluate.classifier.output)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def run(args) -> int:
    overrides = list(args.overrides)
    overrides += [f"evaluate.classifier.output={args.output}"] if args.output else []
    cfg = load_config(args.config, overrides)
    if args.records:
        records, key = Path(args.records), "--records"
    else:
        records, key = cfg.path(cfg.preprocess.output), "preprocess.output"
    if not (records / "records").is_dir():
        raise ConfigError(f"{key}: expected a preprocessed records dir (with records/), got '{records}' "
                          "(run `storygpt preprocess` first)")
    from storygpt.evaluation.classifier_training import train_classifier

    figures = train_classifier(cfg, records, device=args.device)
    print(json.dumps(figures))
    return 0
