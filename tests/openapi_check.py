"""Checks an API answer against what /api/openapi.json promises for it."""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from runs.web.openapi import SCHEMA

DOCUMENT = "urn:runbrake:openapi"
_REGISTRY = Registry().with_resource(
    DOCUMENT, Resource.from_contents(SCHEMA, default_specification=DRAFT202012)
)
# Literal paths first: /api/runs/stop is not run "stop" of /api/runs/{id}.
_TEMPLATES = [
    (re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"), template)
    for template in sorted(SCHEMA["paths"], key=lambda t: t.count("{"))
]


def _pointer(*parts: str) -> str:
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def assert_documented(method: str, path: str, response: Any) -> None:
    """The status is one the operation lists, and the body matches its schema."""
    path = path.split("?", 1)[0]
    template = next((t for pattern, t in _TEMPLATES if pattern.match(path)), None)
    assert template is not None, f"{path} is not in the OpenAPI document"
    operation = SCHEMA["paths"][template].get(method.lower())
    status = str(response.status_code)
    if operation is None:
        # Not an operation of this path: the API's own 405, in its error format.
        assert status == "405", f"{method} {path} answered {status}"
        schema_pointer = _pointer("components", "schemas", "Error")
    else:
        assert status in operation["responses"], (
            f"{method} {template} answered {status}, which the document does not list: "
            f"{response.content[:300]!r}"
        )
        schema_pointer = _pointer(
            "paths", template, method.lower(), "responses", status, "content",
            "application/json", "schema",
        )  # fmt: skip
    assert response["Content-Type"] == "application/json"
    validator = Draft202012Validator({"$ref": f"{DOCUMENT}#/{schema_pointer}"}, registry=_REGISTRY)
    errors = sorted(validator.iter_errors(json.loads(response.content)), key=str)
    assert not errors, f"{method} {template} {status}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
    )
