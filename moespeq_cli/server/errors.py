"""OpenAI's error object for every refusal: ``ApiError`` carries the HTTP status, the
message, the code and the parameter, and the headers a status needs (401's
``WWW-Authenticate``, 503's ``Retry-After``)."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})
        if status == 401:
            self.headers["WWW-Authenticate"] = "Bearer"  # (RFC 9110: a 401 names its scheme)
        if status == 503:
            self.headers["Retry-After"] = "1"

    def body(self) -> dict:
        kind = {
            401: "authentication_error",
            403: "permission_error",
            404: "invalid_request_error",
            500: "server_error",
            503: "server_error",
        }.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def shutting_down(detail: str = "") -> ApiError:
    return ApiError(503, "the server is shutting down" + detail, "shutting_down")
