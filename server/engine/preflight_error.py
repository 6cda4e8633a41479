"""The one error type of kad-serve's start-up checks (shared by preflight and its helpers)."""


class PreflightError(ValueError):
    """The model pair cannot be served with this config; the message says why and how."""
