"""Exceptions batchd raises. Each docstring is the message a user reads."""

from __future__ import annotations


class BatchdError(Exception):
    """batchd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(BatchdError):
    """A setting is invalid."""


class ProviderError(BatchdError):
    """The batch provider call failed.

    ``retryable`` says whether the same call may succeed later;
    ``retry_after`` is the provider's own hint, in seconds, when it gave one.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after


class TruncatedFileError(ProviderError):
    """A downloaded file ended in the middle of a line; download it again."""
