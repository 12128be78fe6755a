"""The JSON API described as OpenAPI 3.1, served at /api/openapi.json.

Kept true by tests: every answer of the API in the suite is validated against the schema it
names here (tests/test_openapi.py), and schemathesis fuzzes every operation against a live
server (no 500 on any input, answers as documented)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse

from runs.models import Channel, Proof, ProviderKind, QuotaTier, Status
from runs.security.hostile import MAX_ID

NULLABLE_STRING: dict[str, Any] = {"type": ["string", "null"]}
TIME: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


ERRORS = {
    "400": _error_response("The request is malformed; `error.field` names the culprit."),
    "401": _error_response("No valid bearer token."),
    "405": _error_response("Not a method of this endpoint."),
    "413": _error_response("The body is larger than the server accepts."),
    "429": _error_response("Too many requests; `Retry-After` says when to try again."),
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _results(component: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["results"],
        "properties": {
            "results": {"type": "array", "items": {"$ref": f"#/components/schemas/{component}"}}
        },
    }


RUN_REF = {"$ref": "#/components/schemas/Run"}
ID: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
REASON: dict[str, Any] = {
    "type": "string",
    "description": "Kept to its first 500 characters, without NUL: cleaned, never refused, "
    "as nothing may stand in the way of a stop.",
}
RUN_ID = {"name": "id", "in": "path", "required": True, "schema": ID}

SCHEMA: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Runbrake API",
        "version": "1",
        "description": "Launch long AI runs at providers, watch them, and stop them for real. "
        'Errors are `{"error": {"code", "message", "field"?}}` with the matching '
        "status; another team's run is a 404.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "paths": {
        "/api/provider-accounts": {
            "get": {
                "operationId": "listProviderAccounts",
                "summary": "Your teams' provider accounts (viewers: names only).",
                "responses": {
                    "200": _json(
                        _results("ProviderAccount"),
                        "The accounts.",
                    ),
                    **{k: v for k, v in ERRORS.items() if k in ("401", "405")},
                },
            }
        },
        "/api/runs": {
            "get": {
                "operationId": "listRuns",
                "summary": "Runs of your teams, newest first, cursor-paginated.",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "description": "Empty means any.",
                        "schema": {"type": "string", "enum": [*Status.values, ""]},
                    },
                    {
                        "name": "team",
                        "in": "query",
                        "description": "Empty means any.",
                        "schema": {"anyOf": [ID, {"const": ""}]},
                    },
                    {
                        "name": "provider",
                        "in": "query",
                        "description": "Empty means any.",
                        "schema": {"type": "string", "enum": [*ProviderKind.values, ""]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "Opaque: the `next_cursor` of the page before.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["results", "next_cursor"],
                            "properties": {
                                "results": {"type": "array", "items": RUN_REF},
                                "next_cursor": NULLABLE_STRING,
                            },
                        },
                        "A page of runs.",
                    ),
                    **{k: v for k, v in ERRORS.items() if k in ("400", "401", "405")},
                },
            },
            "post": {
                "operationId": "launchRun",
                "summary": "Launch a run (honours an Idempotency-Key header).",
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Launch"}}
                    },
                },
                "responses": {
                    "201": {
                        **_json(
                            RUN_REF,
                            "The run, pending until the provider has it. A retry with the same "
                            "Idempotency-Key answers the first run again, marked by the "
                            "`Idempotent-Replayed: true` header.",
                        ),
                        "headers": {
                            "Idempotent-Replayed": {
                                "schema": {"type": "string", "enum": ["true"]},
                                "description": "Present on a replayed launch.",
                            }
                        },
                    },
                    "403": _error_response("Your role may not launch."),
                    "422": _error_response("The Idempotency-Key was used with another body."),
                    **ERRORS,
                },
            },
        },
        "/api/runs/{id}": {
            "get": {
                "operationId": "getRun",
                "summary": "One run, with its stop record.",
                "parameters": [RUN_ID],
                "responses": {
                    "200": _json(RUN_REF, "The run."),
                    "404": _error_response("No such run in your teams."),
                    **{k: v for k, v in ERRORS.items() if k in ("401", "405")},
                },
            }
        },
        "/api/runs/{id}/stop": {
            "post": {
                "operationId": "stopRun",
                "summary": "Stop a run through the verified path.",
                "parameters": [RUN_ID],
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"reason": REASON},
                            }
                        }
                    }
                },
                "responses": {
                    "200": _json(RUN_REF, "The run, stopping or stopped."),
                    "403": _error_response("Your role may not stop this run."),
                    "404": _error_response("No such run in your teams."),
                    "409": _error_response("The run already completed or failed."),
                    **ERRORS,
                },
            }
        },
        "/api/runs/stop": {
            "post": {
                "operationId": "stopRuns",
                "summary": "Stop many runs: by ids, or by a filter.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/StopMany"}}
                    },
                },
                "responses": {
                    "200": _json(
                        _results("StopOutcome"),
                        "One outcome per run.",
                    ),
                    **ERRORS,
                },
            }
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "field": {"type": "string"},
                            "fields": {"type": "object"},
                        },
                    }
                },
            },
            "ProviderAccount": {
                "type": "object",
                "required": ["id", "team", "kind", "name"],
                "properties": {
                    "id": {"type": "integer"},
                    "team": {"type": "integer"},
                    "kind": {"type": "string", "enum": list(ProviderKind.values)},
                    "name": {"type": "string"},
                    "base_url": {"type": "string"},
                    "api_key": {"type": "string", "description": "Masked: its last four."},
                    "quota_tier": {"type": "string", "enum": list(QuotaTier.values)},
                    "quota": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "webhooks": {"type": "boolean"},
                },
            },
            "Launch": {
                "type": "object",
                "required": ["provider_account", "prompt"],
                "properties": {
                    "provider_account": {"type": "integer"},
                    "prompt": {"type": "string", "minLength": 1, "maxLength": 20000},
                    "options": {
                        "type": ["object", "null"],
                        "description": "Per provider (see docs/PROVIDERS.md); null means none.",
                    },
                    "timeout_seconds": {"type": "integer", "minimum": 10, "maximum": 86400},
                    "no_progress_seconds": {"type": "integer", "minimum": 0, "maximum": 86400},
                },
            },
            "StopMany": {
                "description": "`ids` (which wins when both are sent) or a `filter` over the "
                "pending and running runs of your teams.",
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["ids"],
                        "properties": {
                            "ids": {
                                "type": "array",
                                "items": ID,
                                "minItems": 1,
                                "maxItems": 1000,
                            },
                            "reason": REASON,
                        },
                    },
                    {
                        "type": "object",
                        "required": ["filter"],
                        "not": {"required": ["ids"]},
                        "properties": {
                            "filter": {
                                "type": "object",
                                "properties": {
                                    "team": {**ID, "type": ["integer", "null"]},
                                    "provider": {
                                        "type": ["string", "null"],
                                        "enum": [*ProviderKind.values, "", None],
                                    },
                                    "mine": {"type": "boolean"},
                                },
                            },
                            "reason": REASON,
                        },
                    },
                ],
            },
            "StopOutcome": {
                "type": "object",
                "required": ["id", "outcome", "status", "message"],
                "properties": {
                    "id": {"type": "integer"},
                    "outcome": {
                        "type": "string",
                        "enum": [
                            "stopped",
                            "stopping",
                            "queued",
                            "unconfirmed",
                            "already_finished",
                            "not_allowed",
                            "not_found",
                            "failed",
                        ],
                    },
                    "status": {"type": ["string", "null"]},
                    "message": {"type": "string"},
                },
            },
            "Run": {
                "type": "object",
                "required": ["id", "team", "status", "prompt", "output", "created_at", "stop"],
                "properties": {
                    "id": {"type": "integer"},
                    "team": {"type": "integer"},
                    "provider_account": {"type": "integer"},
                    "provider": {"type": "string", "enum": list(ProviderKind.values)},
                    "status": {"type": "string", "enum": list(Status.values)},
                    "external_id": NULLABLE_STRING,
                    "prompt": {"type": "string"},
                    "options": {"type": "object"},
                    "timeout_seconds": {"type": "integer"},
                    "no_progress_seconds": {"type": "integer"},
                    "output": {"type": "string"},
                    "output_incomplete": {"type": "boolean"},
                    "structured_output": {},
                    "error": NULLABLE_STRING,
                    "proof": {"type": ["string", "null"], "enum": [*Proof.values, None]},
                    "usage": {"type": ["object", "null"]},
                    "queued": {"type": "boolean"},
                    "quota_wait": {
                        "type": ["object", "null"],
                        "properties": {
                            "endpoint": {"type": "string"},
                            "until": TIME,
                            "reason": REASON,
                        },
                    },
                    "created_by": NULLABLE_STRING,
                    "created_at": TIME,
                    "started_at": TIME,
                    "finished_at": TIME,
                    "stop": {
                        "type": ["object", "null"],
                        "properties": {
                            "requested_at": TIME,
                            "requested_by": NULLABLE_STRING,
                            "channel": {"type": "string", "enum": list(Channel.values)},
                            "reason": REASON,
                            "provider_answer": {"type": ["object", "null"]},
                            "error": NULLABLE_STRING,
                            "attempts": {"type": "integer"},
                            "confirmed_at": TIME,
                            "confirmation": NULLABLE_STRING,
                            "proof": NULLABLE_STRING,
                            "latency_ms": {"type": ["integer", "null"]},
                            "finished_before_stop": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def openapi(request: HttpRequest) -> JsonResponse:
    """Public, like any API's reference: it names endpoints and shapes, no data."""
    if request.method not in ("GET", "HEAD"):
        response = JsonResponse(
            {"error": {"code": "METHOD_NOT_ALLOWED", "message": "Use GET on this endpoint."}},
            status=405,
        )
        response["Allow"] = "GET, HEAD"
        return response
    return JsonResponse(SCHEMA)
