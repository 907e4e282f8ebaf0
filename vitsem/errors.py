"""Typed errors. Each message names the thing that failed and what to do about it."""

from __future__ import annotations

from pathlib import Path


class VitsemError(Exception):
    """Base class of every error vitsem raises on purpose."""


class ConfigError(VitsemError, ValueError):
    """A setting or option value that cannot work (out of range, unknown choice). Raised by
    every ``validate()`` before any work starts."""


class ImageError(VitsemError):
    """An image file cannot be used. ``reason`` is a short machine-readable code."""

    reason = "unreadable"

    def __init__(self, path: str | Path, detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


class EmptyImageError(ImageError):
    reason = "empty_file"


class NotAnImageError(ImageError):
    reason = "not_an_image"


class TruncatedImageError(ImageError):
    reason = "truncated"


class ImageTooSmallError(ImageError):
    reason = "too_small"


class ImageTooLargeError(ImageError):
    reason = "too_large"


class UnsupportedImageModeError(ImageError):
    reason = "unsupported_mode"


class UnknownModelError(VitsemError):
    """A model name that timm does not know."""


class UnsupportedModelError(VitsemError):
    """A model that vitsem cannot analyse (not a ViT with a patch grid, say)."""


class CheckpointError(VitsemError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


class DatasetError(VitsemError):
    """Input files, a data set folder or a manifest that cannot be used (a missing path, a
    benchmark folder without its manifest, ...)."""


class AuditInputError(VitsemError):
    """Data or a model the spurious-correlation audit cannot answer for."""


class RepairInputError(AuditInputError):
    """Held-out data or a model the last-layer repair cannot use (a group without images,
    too few images, no linear head)."""


class ReviewInputError(VitsemError):
    """A review decision that cannot be recorded: an unknown finding, one the causal check
    did not confirm, or one stored without the pattern that identifies it again."""


class PretrainInputError(VitsemError, ValueError):
    """Pre-training data or settings that cannot work (a keypoint grid that does not match
    the encoder, say)."""


class ProbeDataError(PretrainInputError):
    """Labelled data the linear probe or k-NN cannot evaluate on."""


class RegistryError(CheckpointError):
    """A ``models:/`` reference that does not resolve: malformed, an unknown registered model,
    version or alias, or a version without a vitsem checkpoint."""


class TransientServiceError(VitsemError):
    """A service fault that may pass: an endpoint that is unreachable, timing out, throttling
    or answering 5xx after the client's own retries. The flows' tasks retry it with backoff;
    every other vitsem error is permanent (retrying it only delays the failure)."""
