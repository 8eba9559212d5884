"""Tiny BPE tokenizers trained on the story corpus, shaped like the ones the real models ship.

Each is trained with the target transformers class's own normaliser and pre-tokeniser, then
rebuilt as that class from the learned vocab and merges, so ``save_pretrained`` writes the same
files (``tokenizer.json`` + ``tokenizer_config.json`` naming the class) as the real weights
and ``AutoTokenizer`` loads both the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, GPT2Tokenizer, LlamaTokenizer

CLIP_LENGTH = 77  # CLIP's text context; SD-1.5 pads every caption to it
CLIP_WORD_END = "</w>"


def train_clip_tokenizer(corpus: list[str], vocab_size: int) -> CLIPTokenizer:
    """Lower-cased byte-level BPE with ``</w>`` word ends; pad = eos = ``<|endoftext|>`` (SD-1.5)."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    word_final = [char + CLIP_WORD_END for char in byte_chars]  # like CLIP: any byte ends a word
    vocab, merges = _train_bpe(
        CLIPTokenizer(),
        corpus,
        vocab_size=vocab_size - len(word_final),
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        extra_symbols=word_final,
        initial_alphabet=byte_chars,
        end_of_word_suffix=CLIP_WORD_END,
    )
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LENGTH)


def train_opt_tokenizer(corpus: list[str], vocab_size: int, max_length: int) -> GPT2Tokenizer:
    """GPT-2 byte-level BPE with OPT's special tokens: ``</s>`` starts and ends, ``<pad>`` pads."""
    vocab, merges = _train_bpe(
        GPT2Tokenizer(),
        corpus,
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],  # OPT's ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=max_length,
    )


def train_llama_tokenizer(corpus: list[str], vocab_size: int, max_length: int) -> LlamaTokenizer:
    """Llama-2 style: ``▁``-prefixed BPE with ``<0xNN>`` byte fallback, ``<s>`` ... ``</s>``."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab, merges = _train_bpe(
        LlamaTokenizer(),
        corpus,
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],  # Llama's ids 0..258
        # the class pre-tokenises a whole sentence at once; train per word so merges never span one
        pre_tokenizer=pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
    )
    return LlamaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, model_max_length=max_length
    )


def _train_bpe(
    template,
    corpus: list[str],
    vocab_size: int,
    special_tokens: list[str],
    extra_symbols: Sequence[str] = (),
    pre_tokenizer=None,
    **options,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges with ``template``'s text pipeline; the vocab is laid out as special
    tokens, then single symbols (sorted), then merged tokens in merge order: the trainer's own
    ids for symbols vary from run to run, these do not."""
    backend = template.backend_tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = backend.normalizer
    tokenizer.pre_tokenizer = pre_tokenizer or backend.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False, **options
    )
    tokenizer.train_from_iterator(corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(pair) for pair in model["merges"]]
    merged = list(dict.fromkeys("".join(pair) for pair in merges))
    symbols = sorted((set(model["vocab"]) | set(extra_symbols)) - set(special_tokens) - set(merged))
    return {token: i for i, token in enumerate([*special_tokens, *symbols, *merged])}, merges
