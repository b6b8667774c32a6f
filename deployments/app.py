"""The typed application builder of every serve config's `import_path`."""

import logging

from ray.serve import Application

from deployments.ingress import Ingress
from deployments.model import LocalizationModel
from deployments.postprocessor import Postprocessor
from deployments.preprocessor import Preprocessor
from serve_app.lifecycle import bootstrap
from serve_app.settings import AppArgs, EnvSettings

logger = logging.getLogger(__name__)


# No `from __future__ import annotations` here: Serve validates `args` against the
# annotation's pydantic model only when the annotation is the class itself.
def build_app(args: AppArgs) -> Application:
    """Register the shipped model if the registry has none, then bind the graph."""
    if args.bootstrap:
        version = bootstrap(args, EnvSettings())
        logger.info("registry alias %r -> version %s", args.model_alias, version)
    # Validated once, here (Serve checks `args` against AppArgs); each deployment gets the
    # typed part it needs: the Ingress nearly all of it, the model its own ModelArgs.
    receivers = str(args.receivers_path) if args.receivers_path else None
    return Ingress.bind(
        Preprocessor.bind(receivers),
        LocalizationModel.bind(args.model_args()),
        Postprocessor.bind(receivers),
        args,
    )
