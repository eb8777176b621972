"""Errors shared by the compiled backends."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine; the message says why and what to use instead."""
