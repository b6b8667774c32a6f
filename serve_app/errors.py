"""Domain exceptions raised by the core; the ingress maps them to HTTP codes in one place."""


class RflocError(Exception):
    """Base class of the service's domain errors."""


class InvalidInput(RflocError):
    """A request is malformed; `field` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status_code = status_code


def error_body(exc: InvalidInput, index: int | None = None) -> dict:
    """The JSON error of `exc`; for capture `index` of a batch, its field is prefixed."""
    field = exc.field
    if index is not None and field:
        field = f"captures[{index}].{field}"
    return {"field": field, "message": exc.message, "status": exc.status_code}


def batch_item_error(error: dict, index: int) -> dict:
    """An error dict of the pipeline, for capture `index` of a batch (field prefixed)."""
    field = error.get("field")
    return {**error, "field": f"captures[{index}].{field}"} if field else error


class ConfigError(RflocError):
    """A configuration file or setting is invalid."""


class ModelError(RflocError):
    """A model artifact does not match the contract or failed validation."""


class RegistryUnavailable(RflocError):
    """The model registry could not be reached."""
