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


class ConfigError(RflocError):
    """A configuration file or setting is invalid."""


class ModelError(RflocError):
    """A model artifact does not match the contract or failed validation."""


class RegistryUnavailable(RflocError):
    """The model registry could not be reached."""
