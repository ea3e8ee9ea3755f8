"""Exceptions a user can cause. Each message says what to change; none should surface as a traceback.

The server maps them to OpenAI error bodies (see ``server/errors.py``): ``InvalidRequestError`` -> 400,
``ModelNotFoundError`` -> 404, ``CapacityError`` -> 429/503 (with Retry-After).
"""


class ModelhiveError(Exception):
    """Base class of every error modelhive raises on purpose."""


class ConfigError(ModelhiveError, ValueError):
    """A config file, model spec or model source is invalid. ``key`` names the offending setting."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class InvalidRequestError(ModelhiveError, ValueError):
    """A request parameter is invalid. ``param`` names it (OpenAI's ``param`` field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFoundError(ModelhiveError, KeyError):
    """The request names a model this hive does not serve."""

    def __init__(self, name: str, served: list[str]):
        super().__init__(name)
        self.name = name
        self.served = list(served)

    def __str__(self) -> str:
        return f"The model '{self.name}' does not exist. Served models: {', '.join(self.served)}"


class CapacityError(ModelhiveError):
    """A queue is full; retry after ``retry_after`` seconds. ``status`` is 429 (per model) or 503."""

    def __init__(self, message: str, status: int = 429, retry_after: float = 1.0):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class PlanError(ModelhiveError):
    """The memory plan does not fit the budget; the message names the term that overflows."""


class ModelFailedError(ModelhiveError):
    """A model's forward raised; its in-flight requests fail with this, other models carry on."""
