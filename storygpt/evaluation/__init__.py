"""Scoring generated stories the paper's way (Table 1): the frame classifier, the captioner,
the metrics, and the story world's exact detector scores."""
