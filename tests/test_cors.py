"""``RDV_CORS_ORIGINS``: origins are read as browsers send them, a value that can never match
is refused at start naming the variable, and with none configured nothing wraps the app. The
served behaviour (preflights, the headers on answers) is tested on a real gateway in
``test_http_protocol``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.settings import Settings
from gateway.settings_values import invalid_settings
from gateway.transport.cors import with_cors

pytestmark = pytest.mark.pure


def test_origins_are_read_as_browsers_write_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "RDV_CORS_ORIGINS", '["https://App.Example.com/", "http://localhost:3000", "*"]'
    )
    assert Settings().cors_origins == ["https://app.example.com", "http://localhost:3000", "*"]


@pytest.mark.parametrize(
    "origin", ["app.example.com", "https://app.example.com/predict", "ftp://x", "https://"]
)
def test_a_value_that_is_not_an_origin_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    monkeypatch.setenv("RDV_CORS_ORIGINS", f'["{origin}"]')
    with pytest.raises(ValidationError) as caught:
        Settings()
    message = invalid_settings(caught.value)
    assert message is not None and "RDV_CORS_ORIGINS=" in message, message
    assert "is not an origin" in message, message


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("never called")


def test_without_origins_the_app_is_served_as_it_is() -> None:
    assert with_cors(_app, []) is _app
    assert with_cors(_app, ["https://app.example.com"]) is not _app
