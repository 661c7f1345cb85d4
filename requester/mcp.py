"""``hearth mcp``: the requester's side as Model Context Protocol tools (DESIGN §12), on the official SDK.

The tools are :data:`requester.agent_tools.TOOLS`; each one's ``inputSchema`` is its pydantic model's JSON
schema, and its arguments are checked by that model (not by the SDK), so that every refusal, a malformed
argument included, is a tool result with ``isError: true`` whose one text content is the error shape of
docs/protocol.md: ``{"error": {"code", "domain", "message", "retryable", "details"}}`` (a budget refusal's
details say what is left). A successful call answers its JSON object both as ``structuredContent`` and as
text. Nothing a tool does is a protocol error.

Transports: stdio (the default: an MCP client starts ``hearth mcp --home DIR`` itself), or streamable HTTP
on ``127.0.0.1:PORT/mcp`` with ``--http PORT``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import mcp.types as types
from mcp.server.lowlevel import Server
from pydantic import BaseModel, ValidationError

from core.errors import HearthError
from requester.agent_tools import TOOLS, AgentTools

SERVER_NAME = "hearth"
log = logging.getLogger("hearth.mcp")


def _error(exc: HearthError) -> types.CallToolResult:
    doc = exc.to_dict()
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(doc))], structuredContent=doc, isError=True
    )


def _invalid(tool: str, exc: ValidationError) -> HearthError:
    problems = [
        {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)
    ]
    first = problems[0] if problems else {"loc": "", "msg": "invalid"}
    return HearthError(
        "invalid_arguments",
        f"{tool}: {first['loc']}: {first['msg']}",
        details={"tool": tool, "problems": problems},
        domain="request",
    )


def tool_list() -> list[types.Tool]:
    """The tools, each with the JSON schema of its pydantic input model."""
    return [
        types.Tool(name=name, description=text, inputSchema=model.model_json_schema())
        for name, (model, text) in TOOLS.items()
    ]


async def call(tools: AgentTools, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
    """One tool call: its JSON answer, or its refusal (never an exception)."""
    if name not in TOOLS:
        return _error(
            HearthError(
                "unknown_tool", f"no tool {name!r}", details={"tools": sorted(TOOLS)}, domain="request"
            )
        )
    model: type[BaseModel] = TOOLS[name][0]
    try:
        args = model.model_validate(arguments)
    except ValidationError as exc:
        return _error(_invalid(name, exc))
    try:
        result: dict[str, Any] = await getattr(tools, name)(args)
    except HearthError as exc:
        return _error(exc)
    except sqlite3.Error as exc:
        return _error(
            HearthError("requester_home_failed", f"{name}: {exc}", domain="storage", retryable=True)
        )
    except Exception as exc:  # a local file, a malformed answer: refused, and the server goes on
        log.exception("tool %s failed", name)
        return _error(HearthError("tool_failed", f"{name}: {exc}", domain="request", retryable=True))
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(result))],
        structuredContent=result,
        isError=False,
    )


def build_server(tools: AgentTools) -> Server[Any, Any]:
    server: Server[Any, Any] = Server(SERVER_NAME)

    @server.list_tools()  # type: ignore[no-untyped-call,untyped-decorator]
    async def _list() -> list[types.Tool]:
        return tool_list()

    @server.call_tool(validate_input=False)  # type: ignore[untyped-decorator]
    async def _call(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        return await call(tools, name, arguments)

    return server


async def serve_stdio(home: Path, node: str | None) -> None:
    from mcp.server.stdio import stdio_server

    tools = AgentTools.open(home, node=node)
    try:
        server = build_server(tools)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        tools.close()


async def serve_http(home: Path, node: str | None, port: int, host: str = "127.0.0.1") -> None:
    """Streamable HTTP at ``http://HOST:PORT/mcp``."""
    import contextlib
    from collections.abc import AsyncIterator

    import uvicorn
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.types import Receive, Scope, Send

    tools = AgentTools.open(home, node=node)
    manager = StreamableHTTPSessionManager(app=build_server(tools))

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        await manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    app = Starlette(routes=[Mount("/mcp", app=handle)], lifespan=lifespan)
    try:
        await uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).serve()
    finally:
        tools.close()


__all__ = ["build_server", "call", "serve_http", "serve_stdio", "tool_list"]
