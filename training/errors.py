"""The one exception type the training CLI turns into a clear message and a non-zero exit."""

from __future__ import annotations


class TrainingError(ValueError):
    """Bad input or an unrecoverable training problem; the message names the field/file at fault."""
