"""Errors that carry a user-facing message code.

Library code raises these for *expected* failures (no face, model not installed, bad input);
the handlers turn the code into words from the message catalogue. Anything else is a bug.
"""
from __future__ import annotations

from typing import Any


class UserFacingError(Exception):
    """An expected failure that the user should be told about.

    `code` is a key of the message catalogue (e.g. ``"selfie.no_face"``); `details` fill its
    placeholders. The exception text never contains secrets or file contents.
    """

    def __init__(self, code: str, **details: Any) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code} {details}" if details else code)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "details": self.details}


class ModelNotInstalled(UserFacingError):
    """A model the feature needs is missing under models_dir; the operator must pull it."""

    def __init__(self, model: str, feature: str, pull_command: str) -> None:
        super().__init__("model.not_installed", model=model, feature=feature, pull_command=pull_command)


class JobCancelled(Exception):
    """Raised from a progress callback when the job was cancelled; pipelines let it propagate."""
