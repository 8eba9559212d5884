"""storygpt train-captioner [--records DIR]

Fine-tunes the BLIP-2 captioner behind BLEU4 / CIDEr (``evaluate.captioner``) on the train
split's frames and original captions, and saves it back in place. Tiny presets build the small
BLIP-2 first when ``evaluate.captioner.model`` does not exist yet; real presets fine-tune the
BLIP-2 found there. Prints the run's figures as JSON on the last line.
"""

from __future__ import annotations

import json

from storygpt.commands import add_config_arguments
from storygpt.config import load_config


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--records", help="preprocessed records dir (default: preprocess.output)")


def run(args) -> int:
    from transformers.utils import logging as transformers_logging

    from storygpt.evaluation.captioner_training import train_captioner

    cfg = load_config(args.config, args.overrides)
    records = args.records or cfg.path(cfg.preprocess.output)
    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    summary = train_captioner(cfg, records)
    print(json.dumps(summary))
    return 0
