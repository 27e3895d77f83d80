"""One small exception hierarchy.

Every error a user can cause is a :class:`GraphoptError` with a one-line
message that says what was expected, what was found and who can fix it. The
CLI prints these without a traceback and exits non-zero; anything else is a
bug in graphopt or a plugin and keeps its traceback.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""

    exit_code = 1


class ModelLoadError(GraphoptError):
    """The input is missing, unreadable or not an ONNX model."""

    exit_code = 2


class ModelSaveError(GraphoptError):
    """Writing a model failed; no partial output was left behind."""


class UnknownNameError(GraphoptError):
    """A target, pass or option name that no plugin registered."""

    exit_code = 2


class PluginError(GraphoptError):
    """A plugin registered something invalid (duplicate name, wrong type)."""


class PassError(GraphoptError):
    """A pass raised; the message names the pass and the passes run before it."""

    def __init__(self, pass_name: str, ran_before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.cause = cause
        reason = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        super().__init__(f"pass {pass_name!r} failed after {self.ran_before}: {reason}")


class VerificationError(GraphoptError):
    """The graph is malformed (cycle, dangling input, onnx checker failure)."""


class BackendError(GraphoptError):
    """A backend cannot compile or run a graph."""
