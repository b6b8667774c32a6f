"""The configuration reference of docs/operations.md, generated from the settings models.

    python -m serve_app.docgen          # rewrite the section between the markers
    python -m serve_app.docgen --check  # exit 1 if the committed section is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import annotated_types as at
from pydantic import AliasChoices, BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from serve_app.settings import (
    REPO_ROOT,
    AppArgs,
    BatchConfig,
    EnvSettings,
    IngressConfig,
    ModelConfig,
)

OPERATIONS_MD = REPO_ROOT / "docs" / "operations.md"
BEGIN = "<!-- BEGIN GENERATED configuration reference: python -m serve_app.docgen -->"
END = "<!-- END GENERATED configuration reference -->"
# Which deployment of the serve config reads which `user_config` model in `reconfigure()`.
USER_CONFIG_MODELS: dict[str, type[BaseModel]] = {
    "Ingress": IngressConfig,
    "Preprocessor": BatchConfig,
    "LocalizationModel": ModelConfig,
}
_BOUNDS = ((at.Ge, "ge", "≥"), (at.Gt, "gt", ">"), (at.Le, "le", "≤"), (at.Lt, "lt", "<"))


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables a settings field is read from, in precedence order."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    prefix = EnvSettings.model_config.get("env_prefix", "")
    return [f"{prefix}{name}".upper()]


def _default(field: FieldInfo) -> str:
    value: Any = field.default
    if value is PydanticUndefined:
        return "(required)"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Path):
        # Machine-independent: the reference must read the same on every machine.
        for root, label in ((REPO_ROOT, "<repo>"), (Path.home(), "~")):
            if value == root or root in value.parents:
                return f"`{label}/{value.relative_to(root).as_posix()}`"
        return f"`{value.as_posix()}`"
    return f"`{value}`"


def _type(field: FieldInfo) -> str:
    text = getattr(field.annotation, "__name__", None) or str(field.annotation)
    for noise in ("typing.", "pathlib.", "pydantic.types."):
        text = text.replace(noise, "")
    return f"`{text}`"


def _constraints(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                parts.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _description(name: str, field: FieldInfo) -> str:
    if not field.description:
        raise ValueError(f"{name}: every settings field needs a description (Field(...))")
    return _cell(field.description)


def _doc(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().splitlines()[0]


def _model_table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        rows.append(f"| `{name}` | {_cell(_type(field))} | {_default(field)} | "
                    f"{_constraints(field)} | {_description(name, field)} |")
    return rows


def render_reference() -> str:
    """The generated Markdown between the markers (without the markers)."""
    out = [
        "",
        "### Environment variables",
        "",
        f"{_doc(EnvSettings)} Read by `rfloc` and by every replica, so on a Ray cluster set",
        "them on every node (KubeRay: the containers' `env`). The first name listed wins.",
        "",
        "| variable | default | description |",
        "|---|---|---|",
    ]
    for name, field in EnvSettings.model_fields.items():
        names = " or ".join(f"`{n}`" for n in env_names(name, field))
        out.append(f"| {names} | {_default(field)} | {_description(name, field)} |")
    out += [
        "",
        "### Application arguments: `applications[].args`",
        "",
        f"{_doc(AppArgs)} Changing them redeploys the application.",
        "",
        *_model_table(AppArgs),
    ]
    for deployment, model in USER_CONFIG_MODELS.items():
        out += [
            "",
            f"### `user_config` of `{deployment}`",
            "",
            f"Model `{model.__name__}` in `serve_app/settings.py`. Applied in place by the "
            "replicas' `reconfigure()`: no restart, no dropped request.",
            "",
            *_model_table(model),
        ]
    out += ["", "The `Postprocessor` deployment has no `user_config`.", ""]
    return "\n".join(out)


def replace_section(text: str, section: str) -> str:
    """`text` with the part between BEGIN and END replaced by `section`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers not found: {BEGIN!r} ... {END!r}")
    return text[: start + len(BEGIN)] + "\n" + section + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or `--check`) the configuration reference of docs/operations.md."""
    p = argparse.ArgumentParser(prog="python -m serve_app.docgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", type=Path, default=OPERATIONS_MD)
    p.add_argument("--check", action="store_true", help="exit 1 if the section is stale")
    a = p.parse_args(argv)
    current = a.path.read_text(encoding="utf-8")
    wanted = replace_section(current, render_reference())
    if a.check:
        if current != wanted:
            print(f"{a.path}: configuration reference is stale; run python -m serve_app.docgen",
                  file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        a.path.write_text(wanted, encoding="utf-8")
        print(f"rewrote the configuration reference in {a.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
