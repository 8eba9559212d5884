"""The tiny zoo: small random models in the real layouts (``build``), their tokenizers, and the
pretraining that gives the VAE and the language models what the real ones know (``pretrain``).
Above ``world`` (it renders frames and reads the corpus) and ``models`` (it writes what the
loaders read); nothing in the library below it imports it."""
