"""The OpenAPI 3.1 document served at /openapi.json, describing every route of the API.

The envelope schema comes from the pydantic models themselves, so the document cannot drift from
what the node validates. Signed requests are compact JWS strings (``application/jwt``).
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from core.envelope import Envelope
from core.journal import MAX_EVENT_SEQ
from node.openapi_schemas import (
    BODY_SCHEMAS,
    ERROR_SCHEMA,
    EVENT_SCHEMA,
    JOB_SCHEMA,
    JWT_SCHEMA,
    OVERVIEW_SCHEMA,
)

_HTML_PAGE = {
    "content": {"text/html": {"schema": {"type": "string"}}},
    "headers": {
        "Content-Security-Policy": {"description": "default-src 'self'", "schema": {"type": "string"}}
    },
}


def _json(schema: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(schema, str):
        schema = {"$ref": f"#/components/schemas/{schema}"}
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    descriptions = {
        400: "malformed request or token",
        401: "signature or claims refused",
        402: "the node's ask exceeds max_price (details.ask)",
        403: "refused by policy or audience",
        404: "not found",
        406: "a directory asked for without a format (raw or car)",
        408: "the body did not arrive in time (body_timeout, upload_stalled)",
        409: "conflict: replayed jti, job_id re-used, wrong state",
        413: "body over the node's cap",
        415: "unsupported content type",
        422: "invalid envelope or body",
        429: "per-requester concurrency limit",
        503: "no capacity, or not ready",
        507: "the node's disk is full (journal or blockstore); nothing was recorded, retry later",
    }
    return {str(s): {"description": descriptions[s], **_json("Error")} for s in statuses}


_SIGNED_BODY = {
    "required": True,
    "content": {"application/jwt": {"schema": {"$ref": "#/components/schemas/Jwt"}}},
}
_AUTH_ERRORS = (400, 401, 403, 408, 409, 413, 415, 422)
# A node's job id: hj_ + 26 base32 characters of sha256(iss "\n" job_id) (core.envelope.node_job_id).
JOB_ID_PATTERN = r"^hj_[a-z2-7]{26}$"
_JOB_PARAM = [
    {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
        "description": "the node's job id (hj_...), as quotes and acceptances name it",
    }
]
# The CIDs this node makes and serves: CIDv1, base32, sha2-256, dag-pb ("bafybei...") or raw ("bafkrei..."),
# 36 bytes in 58 characters whose last one carries two zero padding bits.
CID_PATTERN = r"^b(afybei|afkrei)[a-z2-7]{51}[aeimquy4]$"
_CID_PARAM = {
    "name": "cid",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": CID_PATTERN},
    "description": "a CIDv1 (base32, sha2-256; dag-pb or raw), e.g. from PUT /v1/blobs or a job's result",
}
_FORMAT_PARAM = {
    "name": "format",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["raw", "car"]},
    "description": "or Accept: application/vnd.ipld.raw | application/vnd.ipld.car",
}
_GATEWAY_RESPONSES = {
    "200": {
        "description": "verified content",
        "content": {
            "application/vnd.ipld.raw": {"schema": {"type": "string", "format": "binary"}},
            "application/vnd.ipld.car": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "304": {"description": "not modified (ETag)"},
    **_errors(400, 404, 406),
}


def _signed_doc(key: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [key, "jwt"],
        "properties": {key: schema, "jwt": {"$ref": "#/components/schemas/Jwt"}},
    }


def openapi_document() -> dict[str, Any]:
    envelope_schema = TypeAdapter(Envelope).json_schema(ref_template="#/components/schemas/{model}")
    defs = envelope_schema.pop("$defs", {})
    status_doc = _signed_doc("job", {"$ref": "#/components/schemas/Job"})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Hearth provider node",
            "version": "1",
            "description": "Signed job requests (DID-JWT), quotes, job status and events. "
            "Every error is {error: {code, domain, message, retryable, details}}.",
        },
        "paths": {
            "/v1/quotes": {
                "post": {
                    "operationId": "createQuote",
                    "summary": "Price a signed job request; returns a signed quote or a refusal with the ask",
                    "requestBody": _SIGNED_BODY,
                    "responses": {
                        "200": {"description": "the job's live quote, re-issued", **_json("QuoteResponse")},
                        "201": {"description": "a new signed quote", **_json("QuoteResponse")},
                        **_errors(*_AUTH_ERRORS, 402, 429, 503, 507),
                    },
                }
            },
            "/v1/jobs": {
                "post": {
                    "operationId": "submitJob",
                    "summary": "Accept a job against its quote, or bid and accept a bare request in one step",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/jwt": {"schema": {"$ref": "#/components/schemas/Jwt"}},
                            "application/json": {"schema": {"$ref": "#/components/schemas/SubmitBody"}},
                        },
                    },
                    "responses": {
                        "200": {"description": "already accepted (idempotent)", **_json(status_doc)},
                        "201": {"description": "accepted", **_json(status_doc)},
                        **_errors(*_AUTH_ERRORS, 402, 429, 503, 507),
                    },
                }
            },
            "/v1/jobs/{id}": {
                "get": {
                    "operationId": "getJob",
                    "summary": "Job status, signed by the node",
                    "parameters": _JOB_PARAM,
                    "responses": {"200": {"description": "status", **_json(status_doc)}, **_errors(404)},
                }
            },
            "/v1/jobs/{id}/result": {
                "get": {
                    "operationId": "getResult",
                    "summary": "The signed result once the job completed",
                    "parameters": _JOB_PARAM,
                    "responses": {
                        "200": {"description": "result", **_json(_signed_doc("result", {"type": "object"}))},
                        **_errors(404, 409),
                    },
                }
            },
            "/v1/jobs/{id}/events": {
                "get": {
                    "operationId": "jobEvents",
                    "summary": "Server-sent events: transitions and progress (resume with Last-Event-ID)",
                    "parameters": [
                        *_JOB_PARAM,
                        {
                            "name": "after",
                            "in": "query",
                            "description": "send the events after this position (default 0)",
                            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_SEQ},
                        },
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "description": "as 'after' (wins over it): a reconnecting EventSource sends it",
                            "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
                        },
                        {
                            "name": "follow",
                            "in": "query",
                            "description": "true (default): stream until the job rests; false: backlog only",
                            "schema": {"type": "boolean"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "event stream: 'id: <seq>', 'event: <type>', 'data: <Event JSON>' "
                            "per event, and ': keepalive' comments",
                            "content": {
                                "text/event-stream": {
                                    "schema": {"type": "string"},
                                    "itemSchema": {"$ref": "#/components/schemas/Event"},
                                }
                            },
                        },
                        **_errors(400, 404),
                    },
                }
            },
            "/v1/jobs/{id}/cancel": {
                "post": {
                    "operationId": "cancelJob",
                    "summary": "Cancel: a request signed by the job's requester with claim {cancel: <id>}",
                    "parameters": _JOB_PARAM,
                    "requestBody": _SIGNED_BODY,
                    "responses": {
                        "200": {
                            "description": "cancelled | already_completed",
                            **_json(
                                {
                                    "type": "object",
                                    "required": ["job", "outcome", "jwt"],
                                    "properties": {
                                        "job": {"$ref": "#/components/schemas/Job"},
                                        "outcome": {
                                            "type": "string",
                                            "enum": ["cancelled", "already_completed"],
                                        },
                                        "jwt": {"$ref": "#/components/schemas/Jwt"},
                                    },
                                }
                            ),
                        },
                        **_errors(*_AUTH_ERRORS, 404, 507),
                    },
                }
            },
            "/v1/jobs/{id}/receipt": {
                "post": {
                    "operationId": "postReceipt",
                    "summary": "A validator's EIP-712 receipt of the result; settlement starts",
                    "parameters": _JOB_PARAM,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ReceiptBody"}}
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "this receipt was recorded before (idempotent)",
                            **_json(status_doc),
                        },
                        "202": {
                            "description": "receipt recorded; the transaction follows",
                            **_json(status_doc),
                        },
                        **_errors(400, 404, 408, 409, 413, 415, 422, 503, 507),
                    },
                }
            },
            "/v1/blobs": {
                "put": {
                    "operationId": "putBlob",
                    "summary": "Upload an input (streamed, size-capped); a job names it by the returned CID",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary", "minLength": 1}
                            }
                        },
                    },
                    "responses": {
                        "201": {
                            "description": "stored as a UnixFS file (CIDv1, raw leaves, 1 MiB chunks)",
                            **_json(
                                {
                                    "type": "object",
                                    "required": ["cid", "size"],
                                    "properties": {"cid": {"type": "string"}, "size": {"type": "integer"}},
                                }
                            ),
                        },
                        **_errors(400, 408, 413, 507),
                    },
                }
            },
            "/ipfs/{cid}": {
                "get": {
                    "operationId": "getIpfs",
                    "summary": "IPFS Trustless Gateway: one block (raw) or the whole DAG (CAR v1); "
                    "without a format, a file's bytes",
                    "parameters": [_CID_PARAM, _FORMAT_PARAM],
                    "responses": _GATEWAY_RESPONSES,
                },
                "head": {
                    "operationId": "headIpfs",
                    "summary": "As GET, headers only",
                    "parameters": [_CID_PARAM, _FORMAT_PARAM],
                    "responses": {"200": {"description": "present"}, **_errors(400, 404, 406)},
                },
            },
            "/ipfs/{cid}/{path}": {
                "get": {
                    "operationId": "getIpfsPath",
                    "summary": "A file or directory inside a UnixFS directory, by path",
                    "parameters": [
                        _CID_PARAM,
                        {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
                        _FORMAT_PARAM,
                    ],
                    "responses": _GATEWAY_RESPONSES,
                }
            },
            "/v1/capacity": {
                "get": {
                    "operationId": "getCapacity",
                    "summary": "The node's signed offer: resources free/total, kinds, models, prices, "
                    "payout; the same document is pushed to the [registry] URLs",
                    "responses": {
                        "200": {
                            "description": "offer; registries keep the one with the highest sequence",
                            **_json(
                                {
                                    "type": "object",
                                    "required": ["node", "jwt", "issued_at", "sequence", "payout_address"],
                                    "properties": {
                                        "node": {"type": "string"},
                                        "endpoint": {"type": ["string", "null"]},
                                        "payout_address": {"type": ["string", "null"]},
                                        "issued_at": {"type": "integer"},
                                        "sequence": {"type": "integer", "minimum": 1},
                                        "jwt": {"type": "string"},
                                    },
                                }
                            ),
                        }
                    },
                }
            },
            "/v1/overview": {
                "get": {
                    "operationId": "getOverview",
                    "summary": "The operator's overview: capacity, running jobs with progress, queue, recent "
                    "jobs, failures by domain, earnings over time (read-only; polled by /ui)",
                    "parameters": [
                        {
                            "name": "recent",
                            "in": "query",
                            "description": "how many recent jobs to list (default 20)",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 100},
                        },
                        {
                            "name": "period",
                            "in": "query",
                            "description": "earnings per UTC hour (48 shown) or day (30 shown)",
                            "schema": {"type": "string", "enum": ["hour", "day"]},
                        },
                    ],
                    "responses": {
                        "200": {"description": "overview", **_json("Overview")},
                        **_errors(400),
                    },
                }
            },
            "/ui": {
                "get": {
                    "operationId": "dashboard",
                    "summary": "The operator's dashboard (HTML; draws GET /v1/overview)",
                    "responses": {"200": {"description": "the page", **_HTML_PAGE}},
                }
            },
            "/ui/{name}": {
                "get": {
                    "operationId": "dashboardAsset",
                    "summary": "The dashboard's files (index.html, app.js, app.css)",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "maxLength": 100},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "the file",
                            "content": {
                                "text/html": {"schema": {"type": "string"}},
                                "text/javascript": {"schema": {"type": "string"}},
                                "text/css": {"schema": {"type": "string"}},
                            },
                        },
                        **_errors(404),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness",
                    "responses": {"200": {"description": "alive", **_json({"type": "object"})}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Readiness: 503 while starting or draining",
                    "responses": {
                        "200": {"description": "ready", **_json({"type": "object"})},
                        **_errors(503),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI", **_json({"type": "object"})}},
                }
            },
        },
        "components": {
            "schemas": {
                "Jwt": JWT_SCHEMA,
                "Error": ERROR_SCHEMA,
                "Job": JOB_SCHEMA,
                "Event": EVENT_SCHEMA,
                "Overview": OVERVIEW_SCHEMA,
                "Envelope": envelope_schema,
                **defs,
                **BODY_SCHEMAS,
            }
        },
    }
