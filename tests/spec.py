"""Replies checked against the OpenAPI document: status documented for the
route, body valid against the documented schema. The harness runs every
reply of every integration test through this."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from batchd.web import is_console_path

_URI = "urn:batchd:openapi"


class SpecCheck:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        resource = Resource.from_contents(spec, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(_URI, resource)
        self.violations: list[str] = []
        self.checked = 0

    def problems(
        self, method: str, path: str, status: int, content_type: str, body: bytes
    ) -> list[str]:
        """What is wrong with one reply to ``method path`` (a route template)."""
        op = self.spec["paths"].get(path, {}).get(method.lower())
        where = f"{method} {path} -> {status}"
        if op is None:
            return [f"{where}: the route is not in the spec"]
        reply = op["responses"].get(str(status))
        if reply is None:
            return [f"{where}: status not documented ({body[:200]!r})"]
        content = reply.get("content", {})
        media = content_type.split(";")[0].strip()
        if media not in content:
            return [f"{where}: content type {media} not documented"]
        if status in (429, 503) and "headers" not in reply:
            return [f"{where}: Retry-After not documented"]
        if media != "application/json":
            return []
        schema = {
            "$ref": f"{_URI}#/paths/{_pointer(path)}/{method.lower()}/responses/"
            f"{status}/content/application~1json/schema"
        }
        validator = Draft202012Validator(schema, registry=self.registry)
        return [
            f"{where}: {e.json_path}: {e.message}"
            for e in validator.iter_errors(orjson.loads(body))
        ]

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def check(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            response = await handler(request)
            route = request.match_info.route
            if route.resource is None or request.method == "HEAD":
                return response  # no route: aiohttp's own 404/405
            if is_console_path(route.resource.canonical):
                return response  # the console's HTML pages are not the API
            if isinstance(response, web.Response) and response.body is not None:
                body = response.body if isinstance(response.body, bytes) else b""
                self.checked += 1
                self.violations += self.problems(
                    request.method,
                    route.resource.canonical,
                    response.status,
                    response.content_type,
                    body,
                )
                if response.status in (429, 503) and "Retry-After" not in response.headers:
                    self.violations.append(
                        f"{request.method} {request.path}: {response.status} without Retry-After"
                    )
            return response

        return check


def _pointer(path: str) -> str:
    return path.replace("~", "~0").replace("/", "~1")
