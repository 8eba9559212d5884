"""Stage 2, the aligner (paper §3.3): a frozen LLM reads the interleaved story and
writes R [IMG] tokens, which a mapper turns into the Char-LDM's conditioning.

sequence.py    the interleaved layout (I_1, S_1, …, S_n, [IMG_1..R]) of eq. 5, as plain tensors
mapper.py      Mapper_LDM: [IMG] hidden states → L × d conditioning (GILL's mapper)
model.py       StoryAligner: the frozen LM and CLIP vision, the new parts, L_gen + L_align, save/load
data.py        precomputed frame rows → per-n examples → a training batch
metrics.py     reference resolution: is a pronoun frame's conditioning nearest its own characters?
generation.py  StoryGenerator: the autoregressive story loop over a KV cache, and continuation
"""
