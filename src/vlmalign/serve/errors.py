"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         413: "invalid_request_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A refused request: HTTP ``status`` and a message that says what was wrong and where."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def validation_error(errors) -> APIError:
    """A 400 for pydantic / FastAPI validation ``errors``: the deepest one (in a field that may
    be a string or a list of parts, the list's error says more), located by ``param``."""
    e = max(errors, key=lambda x: len(x.get("loc", ())))
    if e.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})",
                        code="invalid_json")
    # a union's branch names ("str", "list[...]") are no part of the request's field path
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and x not in ("str", "dict") and "[" not in str(x)]
    param = ".".join(loc) or None
    if param is None:
        return APIError(400, "the request body must be a JSON object with model and messages (Content-Type: "
                             f"application/json); got: {e['msg']}", code="invalid_value")
    if e.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {e['msg']}{more}", param=param, code="invalid_value")
