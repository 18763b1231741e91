"""The lab's exceptions (also raised by the namespace helpers)."""

from __future__ import annotations


class LabError(RuntimeError):
    """A lab could not be brought up, found or torn down."""


class LabExistsError(LabError):
    """`up` was asked for a lab name that is already in use."""


class LabNotFoundError(LabError):
    """No description (JSON) exists for the lab."""
