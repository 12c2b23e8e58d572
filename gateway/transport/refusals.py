"""The app's refusals that no route answers itself: the data plane's failures, the
framework's own (an unknown route, a wrong method, a body that fails validation) and a client
gone mid-body, each in the shape of its route's protocol (``{"error"}`` under ``/v2``, what
tritonclient decodes; ``{"detail"}`` elsewhere)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway.dataplane.failures import HANDLED, problem_of
from gateway.problems import Problem, Style
from gateway.transport import oip
from gateway.transport.limits import style_of


def install_refusals(app: FastAPI) -> None:
    def _styled(request: Request, problem: Problem) -> JSONResponse:
        """``{"error"}`` under ``/v2`` (what tritonclient decodes), else ``{"detail"}``."""
        if style_of(request.url.path) is Style.ERROR:
            return oip.error(problem)
        return problem.response()

    async def _answer(request: Request, exc: Exception) -> JSONResponse:
        answer = problem_of(exc)
        if answer is None:
            raise exc
        return _styled(request, answer)

    async def _http_error(request: Request, exc: Exception) -> JSONResponse:
        """The framework's own refusals (an unknown route, a wrong method, a route's
        ``HTTPException``) through the same builder."""
        assert isinstance(exc, StarletteHTTPException)
        return _styled(request, Problem(exc.status_code, exc.detail, headers=exc.headers or {}))

    async def _gone(request: Request, exc: Exception) -> Response:
        """The client left (or the body cap answered it) while a route read the body: nobody
        reads this answer, and it is no error of ours to log with a traceback."""
        return Response(status_code=400)

    for failure in (*HANDLED, RequestValidationError):
        app.add_exception_handler(failure, _answer)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _gone)
