"""What the tiny language models read before stage 2: world episodes told in words.

StoryGPT-V assumes a frozen LLM that already resolves "he / she / they": it has read text in
which who a pronoun means matters for what comes next. A tiny LM pretrained only on captions
never needs to know who "she" is, since nothing after "She sits down." depends on it. So the
corpus is freshly planned world episodes (never the dataset's), each told as runs of 5 to 20
consecutive frames with referential captions (the dataset's rule), some runs with the names
kept, and after about half the frames a question and its answer:

    Emma waves hello in the forest. She sits down. Who is there? Emma. Bruno and Emma wave
    hello. They are laughing. Who is there? Bruno and Emma. ...

The answer to "Who is there?" after a pronoun caption is the referent; next-token training on
it is what makes the LM resolve references (``benchmarks/lm_probe.py`` asks it, as one would
ask a real LLM). Runs of up to 20 frames fill the LM's positions, so long stories are not
read at positions it never saw.
"""

from __future__ import annotations

import numpy as np

from storygpt.data.characters import WORLD
from storygpt.data.referential import referential_story
from storygpt.world.stories import FramePlan, join_names, plan_episode

QUESTION = "Who is there?"
EPISODE_FRAMES = 50
RUN_FRAMES = (5, 20)  # frames per text, inclusive
P_QUESTION = 0.5  # share of frames followed by the question and its answer
P_NAMED = 0.2  # share of runs told with every name kept (no pronouns)


def answer(cast: list[str]) -> str:
    """"Emma and Bruno." / "Nobody." (names in the world's order)."""
    return (join_names(sorted(cast, key=WORLD.names.index)) if cast else "Nobody") + "."


def lm_corpus(seed: int, episodes: int, rule: str = "equal") -> list[list[str]]:
    """Texts, each a list of sentences (captions, questions, answers), from ``episodes`` freshly
    planned episodes. Deterministic for (seed, episodes, rule)."""
    rng = np.random.default_rng(seed)
    texts: list[list[str]] = []
    for _ in range(episodes):
        plans = plan_episode(rng, EPISODE_FRAMES)
        start = 0
        while start < len(plans):
            run = plans[start:start + int(rng.integers(RUN_FRAMES[0], RUN_FRAMES[1] + 1))]
            named = rng.random() < P_NAMED
            texts.append(tell(run, rng.random(len(run)) < P_QUESTION, rule=None if named else rule))
            start += len(run)
    return texts


def tell(run: list[FramePlan], ask: list[bool], rule: str | None = "equal") -> list[str]:
    """One text: the run's captions (referential under ``rule``; None keeps every name), frame k
    followed by "Who is there?" and its answer where ``ask[k]``."""
    captions = [p.caption for p in run]
    if rule is not None:
        captions = referential_story(captions, [p.cast for p in run], WORLD, rule)
    text: list[str] = []
    for plan, caption, question in zip(run, captions, ask):
        text += [caption, QUESTION, answer(plan.cast)] if question else [caption]
    return text


def sentences(texts: list[list[str]]) -> list[str]:
    """Every sentence once per occurrence: what the tokenizers are trained on."""
    return [sentence for text in texts for sentence in text]
