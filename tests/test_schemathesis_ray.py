"""Schemathesis against the running app's OpenAPI schema: no 5xx, answers as documented."""

from __future__ import annotations

import pytest

from load.harness import hostile


def test_openapi_schema_references_resolve():
    """Every $ref of the served schema points at a component (the raw-body models too)."""
    from deployments.ingress import app

    schema = app.openapi()
    refs: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    components = schema["components"]["schemas"]
    assert {"CaptureRequest", "BatchRequest", "ReceiverCapture"} <= set(components)
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(components), refs
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/CaptureRequest"}


@pytest.mark.ray
def test_schemathesis_finds_no_server_error_or_schema_violation(app_url):
    summary = hostile.run_schemathesis(app_url, max_examples=25)
    print(f"\nschemathesis: {summary.cases} cases over {len(summary.operations)} operations in "
          f"{summary.seconds:.0f} s; statuses {dict(summary.statuses)}")
    assert {"POST /predict", "POST /predict/batch", "GET /health"} <= set(summary.operations)
    assert summary.cases >= 5 * len(summary.operations)
    assert summary.server_errors == 0, summary.failures
    assert summary.failures == [], "\n".join(summary.failures)
