"""The typed application builder used by every serve config's `import_path`."""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from serve_app.lifecycle import bootstrap
from serve_app.settings import AppArgs, EnvSettings

logger = logging.getLogger(__name__)


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args`, register the shipped model if the registry has none, bind the graph."""
    from deployments.ingress import Ingress
    from deployments.model import LocalizationModel
    from deployments.postprocessor import Postprocessor
    from deployments.preprocessor import Preprocessor

    try:
        app_args = AppArgs.model_validate(args or {})
    except Exception as exc:
        raise ValueError(f"invalid application args: {exc}") from exc
    if app_args.bootstrap:
        version = bootstrap(app_args, EnvSettings())
        logger.info("registry alias %r -> version %s", app_args.model_alias, version)
    dumped = app_args.model_dump(mode="json")
    receivers = str(app_args.receivers_path) if app_args.receivers_path else None
    return Ingress.bind(
        Preprocessor.bind(receivers),
        LocalizationModel.bind(dumped),
        Postprocessor.bind(receivers),
        dumped,
    )
