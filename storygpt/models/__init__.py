"""Pretrained parts: one loader per part (``loading``), the same for the tiny zoo and real
weights; the tiny random zoo itself (``zoo``, with ``tokenizers`` and ``sam``)."""
