"""Does the frozen LM know who "she" is? Two probes of a causal LM on freshly planned world
episodes (never the dataset's, never the LM's corpus: another seed), told as 5-frame stories with
referential captions, pronoun frames and named frames scored apart:

* **answer**: after frame n's caption the LM is asked "Who is there?" and answers greedily; the
  answer is right when it names exactly frame n's cast ("Nobody" for an empty frame). This is
  how one checks that a real LLM resolves a pronoun: ask it.
* **linear**: a ridge probe of the LM's last hidden state at the end of frame n's caption,
  fitted on other stories, asked which characters frame n shows (exact set, 0.5 threshold):
  what the state itself carries before anything asks.

Captions are tokenized one by one after BOS, as the aligner feeds them.

``python -m benchmarks.lm_probe --lm DIR [--stories N] [--rule equal|subset]`` (``DIR``: an OPT or
Llama directory, e.g. the zoo's ``opt``). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import time

PROBE_SEED = 20261203  # not the zoo's corpus seed
RIDGE = 1.0


def probe_stories(stories: int, rule: str) -> list[tuple[list[str], list[str], list[list[str]]]]:
    """(named captions, referential captions, casts) of ``stories`` 5-frame stories."""
    import numpy as np

    from storygpt.data.characters import WORLD
    from storygpt.data.referential import referential_story
    from storygpt.world.stories import FRAMES_PER_STORY, plan_episode

    rng = np.random.default_rng(PROBE_SEED)
    out = []
    while len(out) < stories:
        plans = plan_episode(rng, 10 * FRAMES_PER_STORY)
        for start in range(0, len(plans), FRAMES_PER_STORY):
            run = plans[start:start + FRAMES_PER_STORY]
            captions, casts = [p.caption for p in run], [p.cast for p in run]
            out.append((captions, referential_story(captions, casts, WORLD, rule), casts))
    return out[:stories]


def run_probes(lm_dir: str, stories: int, rule: str) -> dict:
    import numpy as np
    import torch

    from storygpt.data.characters import WORLD
    from storygpt.models.loading import load_lm
    from storygpt.world.corpus import QUESTION

    tokenizer, lm = load_lm(lm_dir)
    lm.eval()
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    question = ids(QUESTION)
    states, labels, pronoun, answered = [], [], [], []
    for named, referential, casts in probe_stories(stories, rule):
        sequence, ends = [tokenizer.bos_token_id], []
        for caption in referential:
            sequence += ids(caption)
            ends.append(len(sequence) - 1)
        with torch.no_grad():
            hidden = lm.model(input_ids=torch.tensor([sequence])).last_hidden_state[0]
            for k, end in enumerate(ends):
                asked = torch.tensor([sequence[:end + 1] + question])
                reply = lm.generate(asked, max_new_tokens=8, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)[0, asked.shape[1]:]
                said = tokenizer.decode(reply, skip_special_tokens=True).split(".")[0]
                answered.append({n for n in WORLD.names if n in said} == set(casts[k]))
                states.append(hidden[end].numpy())
                labels.append(WORLD.to_multi_hot(casts[k]))
                pronoun.append(referential[k] != named[k])
    states, labels = np.array(states), np.array(labels, dtype=float)
    pronoun, answered = np.array(pronoun), np.array(answered)
    fit = np.arange(len(states)) < len(states) // 2  # the first half of the stories fits the ridge probe
    x = np.c_[states, np.ones(len(states))]
    w = np.linalg.solve(x[fit].T @ x[fit] + RIDGE * np.eye(x.shape[1]), x[fit].T @ labels[fit])
    linear = ((x @ w > 0.5) == (labels > 0.5)).all(1)
    share = lambda hits, mask: round(float(hits[mask].mean()), 3) if mask.any() else None  # noqa: E731
    held = ~fit
    return {"answer_pronoun": share(answered, pronoun), "answer_named": share(answered, ~pronoun),
            "linear_pronoun": share(linear, held & pronoun), "linear_named": share(linear, held & ~pronoun),
            "frames": len(states), "pronoun_frames": int(pronoun.sum()), "chance_most_frequent_cast": _chance(labels)}


def _chance(labels) -> float:
    from collections import Counter

    counts = Counter(tuple(row) for row in labels.astype(int).tolist())
    return round(counts.most_common(1)[0][1] / len(labels), 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", required=True, help="LM directory (OPT or Llama), e.g. WORK/zoo/opt")
    parser.add_argument("--stories", type=int, default=200)
    parser.add_argument("--rule", default="equal", choices=["equal", "subset"])
    args = parser.parse_args(argv)

    import torch

    import storygpt  # noqa: F401  (the torchvision shim)
    from benchmarks.common import emit

    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run_probes(args.lm, args.stories, args.rule)
    emit({"benchmark": "lm_probe", "lm": args.lm, "rule": args.rule, "stories": args.stories, **result,
          "wall_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
