"""Errors the engine raises on purpose; the server maps each onto one HTTP status."""


class EngineError(Exception):
    """Base class for errors the engine raises deliberately."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full (`max_queued_requests`): the server answers 429."""


class PromptTooLongError(EngineError, ValueError):
    """prompt + max_tokens does not fit the context window: the server answers 400."""


class EngineDeadError(EngineError):
    """The engine loop stopped after an internal failure: the server answers 500/503."""


class ModelLoadError(EngineError):
    """A checkpoint folder cannot be loaded; the message names the file and tensor."""
