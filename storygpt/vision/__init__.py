"""Frame-level vision models used by preprocessing: super-resolution and masks from boxes."""
