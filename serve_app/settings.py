"""Settings in layers: defaults here, URLs and secrets from the environment, the rest in YAML."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve_app.schemas import MAX_BATCH_CAPTURES

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models"
# An admin token shorter than this is refused at startup (`openssl rand -hex 32` gives 64).
MIN_ADMIN_TOKEN_CHARS = 24


def redact_url(url: str) -> str:
    """The URL without user and password, for messages and logs."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable url>"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


class EnvSettings(BaseSettings):
    """External systems and secrets, from the environment (prefix RFLOC_)."""

    # hide_input_in_errors: a refused secret must not be echoed into logs.
    model_config = SettingsConfigDict(env_prefix="RFLOC_", extra="ignore",
                                      hide_input_in_errors=True)

    state_dir: Path = Field(
        default=Path.home() / ".rfloc",
        description="Embedded registry (SQLite + artifacts) and model cache directory.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "RFLOC_MLFLOW_TRACKING_URI"),
        description="MLflow server URL; unset = embedded SQLite registry under state_dir.",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "RFLOC_REDIS_URL"),
        description="Redis URL of the prediction cache; unset = in-process LRU (or off).",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the admin endpoints, at least 24 characters (surrounding "
                    "whitespace, such as a file's trailing newline, is removed); unset or "
                    "empty = admin endpoints disabled.",
    )
    http_host: str | None = Field(
        default=None,
        description="`rfloc serve` only: replaces the config's http_options.host (a container "
                    "sets 0.0.0.0); unset = the config's host (127.0.0.1 when shipped).",
    )


    @field_validator("admin_token", mode="before")
    @classmethod
    def _strip_admin_token(cls, value: object) -> object:
        # A token read from a file or a Secret often ends in a newline that no client sends.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        token = value.strip()
        if not token:
            return None
        if len(token) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"RFLOC_ADMIN_TOKEN is {len(token)} characters long; use at least "
                f"{MIN_ADMIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")
        return token


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a serve config, or `key=value` to serve run)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(default="localization_model", description="Registered model name.")
    model_alias: str = Field(default="production", description="Alias the service follows.")
    receivers_path: Path | None = Field(default=None,
                                         description="receivers.yaml (default: shipped).")
    default_model_dir: Path = Field(
        default=DEFAULT_MODEL_DIR,
        description="Shipped model registered on first start when the alias is unset.",
    )
    bootstrap: bool = Field(default=True, description="Register the shipped model if needed.")
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Request body cap.")
    max_inflight_body_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Request body bytes one Ingress "
        "replica holds at once (being read or awaiting their answer); a request that would "
        "pass it is answered 503 with Retry-After. At least max_body_bytes.")
    max_batch_captures: int = Field(default=MAX_BATCH_CAPTURES, ge=1, le=MAX_BATCH_CAPTURES,
                                    description="Most captures in one /predict/batch request.")
    cache_ttl_s: float = Field(default=3600.0, gt=0, description="Prediction cache TTL.")
    cache_timeout_ms: float = Field(default=50.0, gt=0, description="Per-call Redis timeout.")
    local_cache_items: int = Field(
        default=1024, ge=0, description="In-process LRU size when REDIS_URL is unset (0 = off).")
    retries: int = Field(default=2, ge=0, le=5, description="Retries of a failed replica call.")
    chain_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Deadline of one try down the chain; a slower "
        "try is cancelled and sent again (to a live replica if Serve has one).")
    chain_budget_s: float = Field(
        default=20.0, gt=0, le=120, description="Time for all tries of one chain call, then "
        "503; keep it under the proxy's request_timeout_s.")

    docs_ui: bool = Field(
        default=False, description="Serve the Swagger UI at /docs; the browser loads its "
        "script and style from the jsDelivr CDN (a Content-Security-Policy allows nothing "
        "else). /openapi.json is always served.")
    pinnable_versions: list[str] | None = Field(
        default=None, description="Model versions any client may pin (`model_version`, the "
        "`serve_multiplexed_model_id` header, OIP `versions/{v}`); unset = the versions the "
        "serving alias has pointed at; [] = none. Other versions need the admin token.")
    pinnable_aliases: list[str] = Field(
        default=[], description="Aliases any client may pin; they are resolved to "
        "the version they name before the request is served. Other aliases need the admin "
        "token.")
    model_cache_versions: int = Field(
        default=8, ge=1, le=1024, description="Model versions kept in the on-disk model "
        "cache of each node; the least recently used beyond it are deleted.")

    def model_args(self) -> ModelArgs:
        """The fields a LocalizationModel replica needs, already validated here."""
        return ModelArgs(**self.model_dump(include=set(ModelArgs.model_fields)))

    @field_validator("pinnable_versions")
    @classmethod
    def _versions_are_numbers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        bad = [v for v in value if not (v.isascii() and v.isdigit() and int(v) > 0)]
        if bad:
            raise ValueError(f"pinnable_versions: not version numbers: {bad}")
        return [str(int(v)) for v in value]

    @model_validator(mode="after")
    def _inflight_fits_a_body(self) -> AppArgs:
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError("max_inflight_body_bytes must be at least max_body_bytes "
                             f"({self.max_body_bytes}), or the largest body is always refused")
        return self

    @model_validator(mode="after")
    def _paths_exist(self) -> AppArgs:
        if self.bootstrap and not (self.default_model_dir / "localization_model.onnx").is_file():
            raise ValueError(
                f"default_model_dir: no localization_model.onnx in {self.default_model_dir}"
            )
        if self.receivers_path is not None and not self.receivers_path.is_file():
            raise ValueError(f"receivers_path: file not found: {self.receivers_path}")
        return self


class ModelArgs(BaseModel):
    """What a LocalizationModel replica takes of `AppArgs`: the model, its network, its cache."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_name: str
    model_alias: str
    receivers_path: Path | None
    default_model_dir: Path
    model_cache_versions: int


class BatchConfig(BaseModel):
    """`user_config` of a batching deployment; applied in `reconfigure()`."""

    max_batch_size: int = Field(default=64, ge=MAX_BATCH_CAPTURES, le=1024,
                                description="Captures per batch (>= the batch endpoint's cap).")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0.0, le=1.0,
                                        description="Longest wait for a batch to fill.")


class ModelConfig(BatchConfig):
    """`user_config` of LocalizationModel."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    max_pinned_versions: int = Field(default=3, ge=1, le=16,
                                     description="Pinned versions kept loaded per replica.")


class IngressConfig(BaseModel):
    """`user_config` of the Ingress: the alias it follows, how often it looks, chain batching."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    max_batch_size: int = Field(default=64, ge=MAX_BATCH_CAPTURES, le=1024,
                                description="Captures per call down the chain.")
    max_batches_in_flight: int = Field(
        default=2, ge=1, le=16, description="Chain calls running at once. Requests arriving "
        "while calls run wait and leave together in the next call (no timer).")
    overlap_min_captures: int = Field(
        default=16, ge=1, le=1024, description="Most captures that must be waiting before a "
        "call starts beside a running one; under lighter load an even share of the captures "
        "in the system (recent peak / max_batches_in_flight) is enough.")

    model_alias: str | None = Field(default=None, description="Override of args.model_alias.")
    poll_interval_s: float = Field(default=10.0, ge=0.5, description="Registry alias poll.")
    challenger_alias: str | None = Field(
        default=None, description="Alias of a challenger model shadowing sampled requests "
        "off the response path (unset: no challenger).")
    challenger_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Fraction of alias-served requests also run on the challenger.")
    challenger_max_inflight: int = Field(
        default=4, ge=1, le=64, description="Shadow runs in flight at most; more are skipped.")
