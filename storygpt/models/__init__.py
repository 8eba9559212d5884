"""Pretrained parts: one loader per part (``loading``), the same for the tiny zoo and real
weights; the SAM config format (``sam``), model cards, and trained exports (``trained``)."""
