"""The OpenAPI 3.1 document served at `GET /openapi.json`, written by hand.

Hand-written rather than generated because Starlette has no model layer to
generate it from, and because the error answers are the interesting part of
this API: every status an operation can give is listed here, and the test suite
checks the server against this document (schemathesis), so the two cannot drift.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from actorflow.core import TaskState
from actorflow.core.pipeline import Pipeline
from actorflow.core.version import __version__

__all__ = ["MAX_LIMIT", "MAX_OFFSET", "openapi_document"]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_OFFSET = 10**9

_STATES = [state.value for state in TaskState]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _json(description: str, schema: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}, **extra}


_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The id `POST /tasks` answered with.",
}

_QUERY_TOKEN = {
    "name": "token",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "The bearer token, for browsers, which cannot set `Authorization` here.",
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What was wrong, and what is allowed."}},
    },
    "TaskState": {"type": "string", "enum": _STATES},
    "TaskCreated": {
        "type": "object",
        "required": ["task_id", "state", "pipeline"],
        "properties": {"task_id": {"type": "string"}, "state": _ref("TaskState"), "pipeline": {"type": "string"}},
    },
    "Transition": {
        "type": "object",
        "required": ["from_state", "to_state", "at", "reason"],
        "properties": {
            "from_state": {"oneOf": [_ref("TaskState"), {"type": "null"}], "description": "null on creation"},
            "to_state": _ref("TaskState"),
            "at": {"type": "number", "description": "seconds since the epoch"},
            "reason": {"type": ["string", "null"]},
        },
    },
    "TaskRecord": {
        "type": "object",
        "required": [
            "task_id",
            "state",
            "payload",
            "result",
            "error",
            "history",
            "created_at",
            "updated_at",
            "trace_id",
            "pipeline",
            "calls",
            "retries",
        ],
        "properties": {
            "task_id": {"type": "string"},
            "state": _ref("TaskState"),
            "payload": {"type": "object"},
            "result": {"description": "the last stage's value (any JSON); null until COMPLETED"},
            "error": {"type": ["string", "null"]},
            "history": {"type": "array", "items": _ref("Transition")},
            "created_at": {"type": "number"},
            "updated_at": {"type": "number"},
            "trace_id": {"type": "string"},
            "pipeline": {"type": "string", "description": "the pipeline the task runs through"},
            "calls": {
                "type": "integer",
                "minimum": 0,
                "description": "stage function calls made for the task, retries included",
            },
            "retries": {
                "type": "integer",
                "minimum": 0,
                "description": "how many of those calls retried a stage (after a transient failure or a timeout)",
            },
            "traceback": {
                "type": ["string", "null"],
                "description": "the last failed service call's traceback (innermost frames, at most 8 KiB)",
            },
        },
    },
    "TaskList": {
        "type": "object",
        "required": ["tasks", "limit", "offset", "next_offset"],
        "properties": {
            "tasks": {"type": "array", "items": _ref("TaskRecord"), "description": "oldest first"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "next_offset": {
                "type": ["integer", "null"],
                "description": "offset of the next page; null after the last page",
            },
        },
    },
    "Stats": {
        "type": "object",
        "description": "The runtime's counters: one per state, plus `submitted`, `in_flight` and more.",
        "required": ["submitted", "in_flight"],
        "properties": {
            **{state: {"type": "integer", "minimum": 0} for state in _STATES},
            "submitted": {"type": "integer", "minimum": 0},
            "in_flight": {"type": "integer", "minimum": 0},
        },
        "additionalProperties": True,
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "failed", "stopped"]},
            "reason": {"type": "string", "description": "Why the runtime is not ok."},
        },
    },
    "TransitionEvent": {
        "type": "object",
        "description": "The `data` of an `event: transition` frame on `GET /events`.",
        "required": ["task_id", "from_state", "to_state", "at", "reason", "trace_id"],
        "properties": {
            "task_id": {"type": "string"},
            "from_state": {"oneOf": [_ref("TaskState"), {"type": "null"}]},
            "to_state": _ref("TaskState"),
            "at": {"type": "number"},
            "reason": {"type": ["string", "null"]},
            "trace_id": {"type": "string"},
        },
    },
}

_UNAVAILABLE = _error(
    "The runtime is stopped or overloaded, or the server is at its limit of requests in progress (or, for "
    "an event stream or a `?wait=` long poll, of those that wait), or it is shutting down; "
    "`Retry-After` says when to try again."
)

_PATHS: dict[str, Any] = {
    "/": {
        "get": {
            "operationId": "dashboard",
            "summary": "The live dashboard (HTML). With a token, open it as `/?token=<token>`.",
            "responses": {"200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}},
        }
    },
    "/healthz": {
        "get": {
            "operationId": "health",
            "summary": "Liveness: does the runtime answer? Never needs the token.",
            "security": [],
            "responses": {
                "200": _json("the runtime answers (ok, or degraded: the journal refuses writes for now)", "Health"),
                "503": _json("the runtime is stopped or has failed", "Health"),
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}
            },
        }
    },
    "/stats": {
        "get": {
            "operationId": "stats",
            "summary": "The runtime's counters.",
            "responses": {"200": _json("the counters", "Stats"), "503": _UNAVAILABLE},
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "The runtime's metrics in the Prometheus text format.",
            "responses": {
                "200": {
                    "description": "the metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "501": _error("prometheus-client is not installed, or the runtime counts no metrics"),
                "503": _UNAVAILABLE,
            },
        }
    },
    "/events": {
        "get": {
            "operationId": "events",
            "summary": "Server-Sent Events: one `event: transition` per state change (data: TransitionEvent).",
            "description": (
                "A comment line (`: heartbeat`) is sent when idle. A client too slow to keep up loses events and "
                'is then sent `event: lagged` with `{"dropped": n}`. The stream ends when the server shuts down, '
                "and, with `?task=`, after that task's terminal transition (sent alone, at once, if the task is "
                "already terminal). "
                "With a token, `?token=<token>` is accepted here, since `EventSource` cannot send headers. "
                "Every frame has an `id:`; a client reconnecting with `Last-Event-ID` is first sent the frames "
                'it missed (the last 1000 are kept), after `event: lagged` (`{"dropped": n}`, null if unknown) '
                "if some are no longer kept."
            ),
            "parameters": [
                {
                    "name": "task",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1},
                    "description": "follow this task's events only",
                },
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    "description": "the id of the last frame received, on reconnection",
                },
            ],
            "responses": {
                "200": {
                    "description": "the stream, until the client leaves, the server stops, or the followed task ends",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "204": {
                    "description": (
                        "the followed task is terminal and the Last-Event-ID already covers its last transition: "
                        "nothing more will come (a browser's EventSource stops reconnecting)"
                    )
                },
                "400": _error("a malformed Last-Event-ID, or an empty or repeated task"),
                "404": _error("no task has the id given as `task`"),
                "503": _error(
                    "too many streams are open, or too many requests wait (streams and long polls may hold half "
                    "of the request slots), or the server is shutting down"
                ),
            },
        }
    },
    "/tasks": {
        "post": {
            "operationId": "submitTask",
            "summary": "Submit a task.",
            "description": (
                "The body is the task's payload, a JSON object of at most 1 MiB. The default validator wants "
                '`{"name": <non-empty string>, "data": <any JSON>}`, but it runs in the pipeline: a payload it '
                "rejects is still accepted here (201) and its task ends FAILED, with the reason in `error`."
            ),
            "parameters": [
                {
                    "name": "pipeline",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "the pipeline to run the task through; the runtime's first when left out",
                },
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
                    "description": (
                        "Retrying with the same key and payload answers with the first task instead of making a "
                        "second one (remembered for 24 h, up to 10,000 keys)."
                    ),
                },
                {
                    "name": "traceparent",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "W3C trace context to continue; ignored when malformed.",
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}, "example": {"name": "a", "data": 1}}},
            },
            "responses": {
                "201": _json(
                    "submitted",
                    "TaskCreated",
                    headers={
                        "Location": {"schema": {"type": "string"}, "description": "`/tasks/{task_id}`"},
                        "Idempotent-Replayed": {
                            "schema": {"type": "string", "enum": ["true"]},
                            "description": "present when this is the answer to an earlier request with the same key",
                        },
                    },
                ),
                "400": _error("empty body, malformed JSON, a malformed Idempotency-Key, or an unknown pipeline"),
                "408": _error("the body did not arrive in time"),
                "413": _error(
                    "the body is over 1 MiB, or the payload over the server's caps (canonical bytes, values)"
                ),
                "415": _error(
                    "the body is not declared `Content-Type: application/json` (what a web page of another "
                    "site could send unasked is refused)"
                ),
                "422": _error(
                    "the body is not a JSON object, nests too deep, the runtime refused it, "
                    "or the Idempotency-Key was used with another payload"
                ),
                "503": _UNAVAILABLE,
            },
        },
        "get": {
            "operationId": "listTasks",
            "summary": "Page through tasks, oldest first.",
            "description": (
                "A page holds `limit` tasks, or fewer if it would grow past 16 MiB; `next_offset` is where the "
                "next page starts, and null after the last one."
            ),
            "parameters": [
                {"name": "state", "in": "query", "required": False, "schema": _ref("TaskState")},
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                },
                {
                    "name": "offset",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                },
            ],
            "responses": {
                "200": _json("one page", "TaskList"),
                "400": _error("a parameter is unknown, repeated or out of range; the message says what is allowed"),
                "503": _UNAVAILABLE,
            },
        },
    },
    "/tasks/{task_id}": {
        "parameters": [_TASK_ID],
        "get": {
            "operationId": "getTask",
            "summary": "One task's record, history included.",
            "parameters": [
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "minimum": 0, "maximum": 60},
                    "description": "answer once the task is terminal, or after this many seconds (at most 60)",
                }
            ],
            "responses": {
                "200": _json("the record", "TaskRecord"),
                "400": _error("wait is not a number of seconds from 0 to 60, or is repeated"),
                "404": _error("no task has this id"),
                "503": _UNAVAILABLE,
            },
        },
        "delete": {
            "operationId": "cancelTask",
            "summary": "Cancel a task.",
            "responses": {
                "200": _json("cancelled: the record, now CANCELLED", "TaskRecord"),
                "202": _json("cancellation accepted and under way: the record as it is now", "TaskRecord"),
                "404": _error("no task has this id"),
                "409": _error("the task is already COMPLETED, FAILED or CANCELLED"),
                "501": _error("this runtime cannot cancel tasks"),
                "503": _UNAVAILABLE,
            },
        },
    },
}


_MALFORMED_HTTP = "a request that is not valid HTTP (e.g. a header with illegal characters), refused as plain text by the HTTP server before the API sees it"  # noqa: E501


_MISDIRECTED = _error(
    "the `Host` header names another server (a DNS rebinding, say): this one answers to localhost, 127.0.0.1, "
    "[::1], the address it is reached on and the host it is bound to, each with its port, and to the names "
    "added with `--allowed-host`"
)


def _document_malformed_http(responses: dict[str, Any]) -> None:
    """Any route can answer 400 in plain text: uvicorn refuses malformed HTTP before the app runs."""
    plain = {"schema": {"type": "string"}}
    if "400" in responses:
        response = responses["400"]
        response["description"] += f"; or {_MALFORMED_HTTP}"
        response.setdefault("content", {})["text/plain"] = plain
    else:
        responses["400"] = {"description": _MALFORMED_HTTP, "content": {"text/plain": plain}}


def openapi_document(
    *, token_required: bool, metrics_public: bool = False, pipelines: Sequence[Pipeline] = ()
) -> dict[str, Any]:
    """The OpenAPI document; with `token_required`, every operation but `/healthz` lists bearer auth and 401.

    With `metrics_public`, `/metrics` is open too. `pipelines` (the runtime's) set the allowed
    pipeline names of ``POST /tasks`` and the task states, and are described under ``x-pipelines``.
    """
    paths = copy.deepcopy(_PATHS)
    schemas = copy.deepcopy(_SCHEMAS)
    if pipelines:
        states = list(dict.fromkeys(state.value for pipeline in pipelines for state in pipeline.states))
        schemas["TaskState"]["enum"] = states
        schemas["Stats"]["properties"] = {
            **{state: {"type": "integer", "minimum": 0} for state in states},
            "submitted": {"type": "integer", "minimum": 0},
            "in_flight": {"type": "integer", "minimum": 0},
        }
        names = [pipeline.name for pipeline in pipelines]
        for parameter in paths["/tasks"]["post"]["parameters"]:
            if parameter["name"] == "pipeline":
                parameter["schema"]["enum"] = names
                parameter["description"] += f" ({names[0]!r})"
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "actorflow",
            "version": __version__,
            "description": "Submit tasks to an actorflow runtime, follow them, cancel them, watch transitions live.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if pipelines:
        document["x-pipelines"] = [pipeline.describe() for pipeline in pipelines]
    for path, item in paths.items():
        for method, operation in item.items():
            if method != "parameters":
                _document_malformed_http(operation["responses"])
                if path != "/healthz":
                    operation["responses"]["421"] = copy.deepcopy(_MISDIRECTED)
    if token_required:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
        for path, item in paths.items():
            for method, operation in item.items():
                if method == "parameters" or path == "/healthz" or (path == "/metrics" and metrics_public):
                    if method != "parameters":
                        operation["security"] = []
                    continue
                operation["responses"]["401"] = _error("missing or invalid bearer token")
                if path in ("/", "/events"):
                    operation.setdefault("parameters", []).append(_QUERY_TOKEN)
    return document
