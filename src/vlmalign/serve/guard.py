"""What every request passes before the app sees it: the API key (when one is set) and the body
size limit (the body is read up to the limit, never past it)."""

from __future__ import annotations

import hmac
import json

from .errors import APIError

OPEN_PATHS = ("/health",)


async def send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: 401 without the right ``Authorization: Bearer KEY``; 413 for a body over
    ``max_body_bytes`` (from Content-Length, or counted while reading)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS:
            err = self._auth_error(headers.get(b"authorization", b"").decode("latin-1"))
            if err:
                return await send_error(send, err)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await send_error(send, self._too_large(f"{int(declared):,}"))
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await send_error(send, self._too_large("more than " + f"{self.max_body:,}"))
        first = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    def _auth_error(self, header: str) -> APIError | None:
        scheme, _, key = header.partition(" ")
        if not header:
            return APIError(401, "no API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return APIError(401, "wrong API key", code="invalid_api_key")
        return None

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size} bytes, over this server's limit of {self.max_body:,} "
                             "bytes (--max-body-bytes)", code="request_too_large")
