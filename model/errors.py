"""Errors a user can cause. Each message says what was expected, what was found, what to do."""


class ErnieError(Exception):
    """Base of every error the CLI reports as one line (exit 1)."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class CheckpointError(ErnieError):
    """Missing, corrupt or mismatched checkpoint files (config, shards, tensors)."""


class ModelNotFoundError(ErnieError):
    """A model name that resolves to nothing: unknown repo, or offline without a cached copy."""


class MediaError(ErnieError):
    """An image or video that cannot be used: unreadable, unsupported, truncated or hostile."""


class ProcessorError(ErnieError):
    """Tokenizer or processor files that are missing or inconsistent."""


class ContextLengthError(ErnieError):
    """Prompt plus requested new tokens exceed the model's context length."""


class DownloadError(MediaError):
    """A URL that could not be fetched; `cause` says why, so a caller can name the setting that helps.

    cause: "http" (an error status), "network" (DNS, refused, reset), "timeout" (one read),
    "deadline" (the whole download), "too_large" (declared or received bytes over the limit).
    """

    def __init__(self, message: str, hint: str | None = None, cause: str = "network"):
        super().__init__(message, hint)
        self.cause = cause
