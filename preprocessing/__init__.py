"""Ray Data preprocessing: dataset frames -> super-resolution -> masks -> Parquet records.

Thin Ray layer over ``storygpt.vision.prepare``: the same functions run without Ray in tests.
"""

import storygpt  # noqa: F401  (torchvision shim before anything imports it, in every worker)
