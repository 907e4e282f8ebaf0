"""vitsem: explain and audit Vision Transformers through SIFT keypoints.

The core (keypoints, attention, analysis, benchmark data, training) imports nothing from
storage or orchestration; see the README for the layering.
"""

from vitsem.errors import (
    CheckpointError,
    ImageError,
    UnknownModelError,
    UnsupportedModelError,
    VitsemError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ImageError",
    "UnknownModelError",
    "UnsupportedModelError",
    "VitsemError",
    "__version__",
]
