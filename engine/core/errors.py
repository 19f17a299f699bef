"""Errors the engine raises on purpose; the server maps each onto one HTTP status."""


class EngineError(Exception):
    """Base class for errors the engine raises deliberately."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full (`max_queued_requests`): the server answers 429."""


class PromptTooLongError(EngineError, ValueError):
    """prompt + max_tokens does not fit the context window: the server answers 400."""


class EngineDeadError(EngineError):
    """The engine loop stopped for good after internal failures: the server answers 503."""


class StepFailedError(EngineError):
    """An engine step raised; `request_ids` were in it (the step's batch) and are failed alone."""

    def __init__(self, request_ids: list[str]):
        super().__init__(f"engine step failed for requests {request_ids}")
        self.request_ids = request_ids


class RequestFailedError(EngineError):
    """This request was in an engine step that raised: the server answers 500; others go on."""


class ModelLoadError(EngineError):
    """A checkpoint folder cannot be loaded; the message names the file and tensor."""
