"""Domain exceptions raised by the core, and the one builder of the JSON error they become."""

from __future__ import annotations


class RflocError(Exception):
    """Base class of the service's domain errors."""


class InvalidInput(RflocError):
    """A request is malformed; `field` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status_code = status_code


class ConfigError(RflocError):
    """A configuration file or setting is invalid."""


class ModelError(RflocError):
    """A model artifact does not match the contract or failed validation."""


class RegistryUnavailable(RflocError):
    """The model registry could not be reached."""


class Unavailable(RflocError):
    """The service cannot answer now (overload, no replica, no answer in time): a 503."""


# What a front door answers itself (4xx/503); anything else is a bug: logged, answered 500.
DOMAIN_ERRORS = (InvalidInput, ModelError, Unavailable, RegistryUnavailable)


def error_dict(field: str | None, message: str, status: int) -> dict:
    """The error object of the rfloc API (`schemas.ErrorBody`); every error is built here."""
    return {"field": field, "message": message, "status": status}


def error_body(exc: InvalidInput, index: int | None = None) -> dict:
    """The JSON error of `exc`; for capture `index` of a batch, its field is prefixed."""
    field = exc.field
    if index is not None and field:
        field = f"captures[{index}].{field}"
    return error_dict(field, exc.message, exc.status_code)


def batch_item_error(error: dict, index: int) -> dict:
    """An error dict of the pipeline, for capture `index` of a batch (field prefixed)."""
    field = error.get("field")
    return {**error, "field": f"captures[{index}].{field}"} if field else error


def domain_cause(exc: BaseException) -> BaseException:
    """The domain error itself when `exc` carries one raised in another process.

    An error raised in a replica arrives as Ray's wrapper, an instance of its class whose
    text is the remote traceback (paths, PID, address): never the text of an answer.
    """
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, RflocError) and isinstance(exc, RflocError) else exc


def http_error(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """Status, body `{"error": {...}}` and headers of a domain error: the one mapping."""
    exc = domain_cause(exc)
    if isinstance(exc, InvalidInput):
        return exc.status_code, {"error": error_body(exc)}, {}
    if isinstance(exc, ModelError):  # only a pinned version can be unknown to a request
        return 404, {"error": error_dict("model_version", str(exc), 404)}, {}
    if isinstance(exc, Unavailable | RegistryUnavailable):
        return 503, {"error": error_dict(None, str(exc), 503)}, {"Retry-After": "1"}
    return 500, {"error": error_dict(None, "internal error", 500)}, {}
