"""Errors a user can act on. Each message says what was wrong and what to do about it."""


class AptError(Exception):
    """Base of every error this toolchain raises on purpose."""


class InvalidInputError(AptError, ValueError):
    """A tensor, pattern, option or file is not what the operation needs."""


class SingularHessianError(AptError, RuntimeError):
    """The damped Hessian could not be factorised even after the allowed damping increases."""


class UnsupportedModelError(AptError, ValueError):
    """The model family (``config.model_type``) has no adapter."""


class ModelNotFoundError(AptError, FileNotFoundError):
    """A model path, short name or hub id that could not be resolved."""


class MissingDependencyError(AptError, ImportError):
    """An optional package that the requested feature needs is not installed."""


class OutputError(AptError, OSError):
    """A write the operating system refused: no space, a quota, a read-only file system, no permission,
    a file size limit. The message names what could not be written and where."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


class NotEnoughSpaceError(OutputError):
    """The free space a run or an export needs is not there: refused before any work."""
