"""The component schemas of the OpenAPI document (:mod:`node.openapi`): the shapes of what the node
answers and takes, kept apart from the routes that use them."""

from __future__ import annotations

from typing import Any

JWT_SCHEMA = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$",
    "description": "compact JWS (DID-JWT) signed by the requester's DID; "
    "payload {iss, aud, iat, exp, jti, job}",
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "domain", "message", "retryable", "details"],
            "properties": {
                "code": {"type": "string"},
                "domain": {"type": "string"},
                "message": {"type": "string"},
                "retryable": {"type": "boolean"},
                "details": {"type": "object"},
            },
        }
    },
}

JOB_SCHEMA = {
    "type": "object",
    "required": ["id", "job_id", "requester", "kind", "state"],
    "properties": {
        "id": {"type": "string", "description": "the node's id: hj_ + base32(sha256(iss \\n job_id))[:26]"},
        "job_id": {"type": "string"},
        "requester": {"type": "string"},
        "kind": {"type": "string", "enum": ["ffmpeg_transcode", "vllm_batch"]},
        "state": {"type": "string"},
        "price": {"type": ["string", "null"]},
        "currency": {"type": "string"},
        "quote_id": {"type": ["string", "null"]},
        "quote_expires_at": {"type": ["number", "null"]},
        "envelope_hash": {"type": "string"},
        "attempts": {"type": "integer"},
        "failure": {"type": ["object", "null"]},
        "created_at": {"type": "number"},
        "updated_at": {"type": "number"},
    },
}


_NUMBER_OR_NULL = {"type": ["number", "null"]}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_RESOURCES = {
    "type": "object",
    "required": ["cpus", "memory_mb", "gpus"],
    "properties": {"cpus": {"type": "number"}, "memory_mb": {"type": "integer"}, "gpus": {"type": "integer"}},
}
_CLUSTER_SCHEMA = {
    "type": ["object", "null"],
    "description": "the cluster the node runs its jobs on ([cluster]); null when it runs them itself",
    "required": ["engine", "address", "alive", "lost_runs", "workers"],
    "properties": {
        "engine": {"type": "string", "enum": ["ray"]},
        "address": {"type": "string", "description": "the cluster's address the node joined"},
        "alive": {"type": "integer", "minimum": 0, "description": "workers alive now"},
        "lost_runs": {
            "type": "integer",
            "minimum": 0,
            "description": "runs lost to a worker that died under them since the node started (worker_lost)",
        },
        "workers": {
            "type": "array",
            "description": "every worker the cluster knows, alive or dead, by name",
            "items": {
                "type": "object",
                "required": [
                    "node_id",
                    "name",
                    "address",
                    "alive",
                    "cpus",
                    "memory_mb",
                    "gpus",
                    "models",
                    "running",
                    "lost",
                ],
                "properties": {
                    "node_id": {"type": "string"},
                    "name": {"type": "string", "description": "its hearth-worker name, else address/node id"},
                    "address": {"type": "string"},
                    "alive": {"type": "boolean"},
                    "cpus": {"type": "number", "minimum": 0},
                    "memory_mb": {"type": "integer", "minimum": 0},
                    "gpus": {"type": "integer", "minimum": 0},
                    "models": {"type": "array", "items": {"type": "string"}, "description": "its model CIDs"},
                    "running": {"type": "integer", "minimum": 0, "description": "containers run there now"},
                    "lost": {"type": "integer", "minimum": 0, "description": "runs lost on it (worker_lost)"},
                },
            },
        },
    },
}
OVERVIEW_SCHEMA = {
    "type": "object",
    "description": "the operator's overview (GET /v1/overview): read-only, no keys or tokens",
    "required": ["generated_at", "node", "capacity", "jobs", "failures", "earnings", "cluster"],
    "properties": {
        "generated_at": {"type": "number"},
        "node": {
            "type": "object",
            "required": ["did", "name", "ready", "started_at", "paused", "payments"],
            "properties": {
                "did": {"type": "string"},
                "name": {"type": "string"},
                "ready": {"type": "boolean"},
                "started_at": {"type": "number"},
                "paused": {"type": "boolean", "description": "[scheduler] paused: jobs queue, none start"},
                "payments": {"type": "boolean", "description": "a [chain] is configured"},
                "market": {
                    "type": ["object", "null"],
                    "description": "the node's listing in the on-chain registry; null when [market] asks "
                    "for none",
                    "required": ["registry", "wallet", "endpoint", "state", "tx", "error", "changed_at"],
                    "properties": {
                        "registry": {"type": "string"},
                        "wallet": {"type": "string"},
                        "endpoint": {"type": "string"},
                        "state": {
                            "type": "string",
                            "enum": ["checking", "pending", "listed", "chain_unavailable", "failed"],
                        },
                        "tx": {"type": ["string", "null"], "description": "the last registry transaction"},
                        "error": {"type": ["string", "null"]},
                        "changed_at": {"type": "number"},
                    },
                },
            },
        },
        "capacity": {
            "type": "object",
            "required": ["resources", "machine", "kinds", "models"],
            "properties": {
                "resources": {
                    "type": "object",
                    "description": "the capacity ledger: total, used (held by quotes and jobs), free",
                    "required": ["total", "used", "free", "holds", "utilisation"],
                    "properties": {
                        "total": _RESOURCES,
                        "used": _RESOURCES,
                        "free": _RESOURCES,
                        "holds": {"type": "integer"},
                        "utilisation": {"type": "number"},
                    },
                },
                "machine": {"type": "object", "description": "what discovery found, and the part offered"},
                "kinds": {"type": "array", "items": {"type": "string"}},
                "models": {"type": "array", "items": {"type": "object"}},
            },
        },
        "jobs": {
            "type": "object",
            "required": ["by_state", "queued", "running", "recent"],
            "properties": {
                "by_state": _COUNTS,
                "queued": {"type": "integer", "description": "accepted jobs waiting to run"},
                "running": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "job_id", "kind", "stage", "percent", "started_at"],
                        "properties": {
                            "id": {"type": "string"},
                            "job_id": {"type": "string"},
                            "kind": {"type": "string"},
                            "requester": {"type": "string"},
                            "price": {"type": ["string", "null"]},
                            "attempt": {"type": "integer", "minimum": 1},
                            "started_at": {"type": "number"},
                            "resources": _RESOURCES,
                            "stage": {
                                "type": "string",
                                "description": "fetching, probing, transcoding, inferring, checking, ... "
                                "(starting before the first report)",
                            },
                            "percent": _NUMBER_OR_NULL,
                            "progress_at": _NUMBER_OR_NULL,
                            "progress": {"type": "object", "description": "the rest of the latest report"},
                        },
                    },
                },
                "recent": {
                    "type": "array",
                    "description": "the jobs recorded last, newest first",
                    "items": {
                        "type": "object",
                        "required": ["id", "job_id", "kind", "state", "price", "created_at"],
                        "properties": {
                            "id": {"type": "string"},
                            "job_id": {"type": "string"},
                            "kind": {"type": "string"},
                            "state": {"type": "string"},
                            "price": {"type": ["string", "null"]},
                            "requester": {"type": "string"},
                            "attempts": {"type": "integer"},
                            "created_at": {"type": "number"},
                            "updated_at": {"type": "number"},
                            "failure": {"type": ["object", "null"]},
                        },
                    },
                },
            },
        },
        "failures": {
            "type": "object",
            "description": "jobs that rest in failed",
            "required": ["total", "by_domain", "recent"],
            "properties": {
                "total": {"type": "integer"},
                "by_domain": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["count", "codes"],
                        "properties": {"count": {"type": "integer"}, "codes": _COUNTS},
                    },
                },
                "recent": {"type": "array", "items": {"type": "object"}},
            },
        },
        "earnings": {
            "type": "object",
            "description": "receipt amounts of settled jobs (decimal strings and base units) and gas spent",
            "required": ["currency", "decimals", "earned", "earned_units", "gas_wei", "series"],
            "properties": {
                "currency": {"type": "string"},
                "decimals": {"type": "integer"},
                "earned": {"type": "string"},
                "earned_units": {"type": "integer"},
                "gas_wei": _COUNTS,
                "series": {
                    "type": "object",
                    "required": ["period", "period_seconds", "since", "points"],
                    "properties": {
                        "period": {"type": "string", "enum": ["hour", "day"]},
                        "period_seconds": {"type": "integer"},
                        "since": {"type": "number"},
                        "points": {
                            "type": "array",
                            "description": "every period since 'since' (UTC), the current one last",
                            "items": {
                                "type": "object",
                                "required": ["start", "earned", "earned_units", "jobs"],
                                "properties": {
                                    "start": {"type": "number"},
                                    "earned": {"type": "string"},
                                    "earned_units": {"type": "integer"},
                                    "jobs": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
            },
        },
        "cluster": _CLUSTER_SCHEMA,
    },
}
EVENT_SCHEMA = {
    "type": "object",
    "description": "the data of one server-sent event (its SSE id is seq, its SSE event name is type); "
    "a stream cut by a node-side failure ends with an event named 'error' whose data is an Error",
    "required": ["seq", "job", "at", "type", "from", "to", "actor", "reason", "domain", "retryable", "data"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1},
        "job": {"type": "string"},
        "at": {"type": "number"},
        "type": {"type": "string", "enum": ["transition", "progress", "note"]},
        "from": {"type": ["string", "null"]},
        "to": {"type": ["string", "null"]},
        "actor": {"type": "string"},
        "reason": {"type": "string"},
        "domain": {"type": ["string", "null"]},
        "retryable": {"type": ["boolean", "null"]},
        "data": {"type": ["object", "null"]},
    },
}
# The bodies requesters and validators send, and the quote answer.
BODY_SCHEMAS: dict[str, Any] = {
    "ReceiptBody": {
        "type": "object",
        "required": ["receipt", "signature"],
        "properties": {
            "receipt": {
                "type": "object",
                "description": "EIP-712 Receipt {jobId, resultDigest, passed, amount, "
                "provider} under the escrow's domain, with the node's job id",
                "required": [
                    "job",
                    "chain_id",
                    "escrow",
                    "escrow_job_id",
                    "result_digest",
                    "passed",
                    "amount",
                    "provider",
                ],
                "properties": {
                    "job": {"type": "string"},
                    "chain_id": {"type": "integer", "minimum": 1},
                    "escrow": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
                    "escrow_job_id": {"type": "string", "pattern": "^0x[0-9a-fA-F]{64}$"},
                    "result_digest": {"type": "string", "pattern": "^0x[0-9a-fA-F]{64}$"},
                    "passed": {"type": "boolean"},
                    "amount": {"type": "string", "pattern": "^[0-9]{1,78}$"},
                    "provider": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
                },
            },
            "signature": {"type": "string", "pattern": "^0x[0-9a-fA-F]{130}$"},
            "credential": {
                "type": "object",
                "description": "optional W3C VC wrapping the receipt",
            },
        },
    },
    "SubmitBody": {
        "type": "object",
        "required": ["request"],
        "properties": {
            "request": {"$ref": "#/components/schemas/Jwt"},
            "quote": {"$ref": "#/components/schemas/Jwt"},
            "funding": {
                "description": "how the quote's funding_terms are funded, by the node: the payer's EIP-3009 "
                "authorization (the node submits fundWithAuthorization, the payer pays no gas), or a "
                "spending grant's agent's signed Spend (the node submits fundFromGrant, the grant's owner "
                "pays; the request's iss must be the agent)",
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["from", "valid_after", "valid_before", "signature"],
                        "properties": {
                            "type": {"type": "string", "enum": ["eip3009"]},
                            "from": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
                            "valid_after": {"type": "string", "pattern": "^[0-9]{1,78}$"},
                            "valid_before": {"type": "string", "pattern": "^[0-9]{1,78}$"},
                            "signature": {"type": "string", "pattern": "^0x[0-9a-fA-F]{130}$"},
                        },
                    },
                    {
                        "type": "object",
                        "required": ["grant", "spend", "signature"],
                        "properties": {
                            "type": {"type": "string", "enum": ["grant"]},
                            "grant": {"type": "string", "pattern": "^[0-9]{1,78}$"},
                            "spend": {
                                "type": "object",
                                "required": [
                                    "grantId",
                                    "jobId",
                                    "provider",
                                    "validator",
                                    "amount",
                                    "deadline",
                                ],
                                "properties": {
                                    "grantId": {"type": "string", "pattern": "^[0-9]{1,78}$"},
                                    "jobId": {"type": "string", "pattern": "^0x[0-9a-fA-F]{64}$"},
                                    "provider": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
                                    "validator": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
                                    "amount": {"type": "string", "pattern": "^[0-9]{1,78}$"},
                                    "deadline": {"type": "integer", "minimum": 0},
                                },
                            },
                            "signature": {"type": "string", "pattern": "^0x[0-9a-fA-F]{130}$"},
                        },
                    },
                ],
            },
        },
    },
    "QuoteResponse": {
        "type": "object",
        "required": ["quote", "jwt", "job", "reused"],
        "properties": {
            "quote": {
                "type": "object",
                "description": "the quote's claims (price, expiry, estimate)",
            },
            "jwt": {"$ref": "#/components/schemas/Jwt"},
            "job": {"$ref": "#/components/schemas/Job"},
            "reused": {"type": "boolean"},
        },
    },
}
