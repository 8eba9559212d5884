"""storygpt zoo --preset tiny --out DIR"""

from __future__ import annotations

import json
import time

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, load_config
from storygpt.layout import WorkDir
from storygpt.world.corpus import lm_corpus

LM_CORPUS_EPISODES = 400  # 20 000 frames of freshly planned episodes, with their questions


def build_zoo_quietly(cfg, out) -> dict:
    """The tiny zoo from the config (tokenizers and LMs trained on :func:`lm_corpus`), no save bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from storygpt.zoo.build import build_tiny_zoo

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    corpus = lm_corpus(seed=cfg.seed, episodes=LM_CORPUS_EPISODES, rule=cfg.data.referential_rule)
    return build_tiny_zoo(cfg.zoo, out, corpus, seed=cfg.seed)


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--preset", help="the same as --config PRESET")
    p.add_argument("--out", help="model dir (default: {work_dir}/zoo)")


def run(args) -> int:
    config = args.preset or args.config
    cfg = load_config(config, args.overrides)
    if cfg.zoo is None:
        raise ConfigError(f"zoo: preset '{cfg.preset}' has no tiny model sizes (only tiny presets build a zoo)")
    out = args.out or WorkDir.of(cfg).zoo
    start = time.perf_counter()
    parts = build_zoo_quietly(cfg, out)
    print(json.dumps({"zoo": str(out), "parts": {k: str(v) for k, v in parts.items()},
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0
