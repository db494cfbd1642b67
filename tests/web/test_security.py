"""Safe defaults: cross-site state changes refused unless --enable-cors-header allows them, and a
token on every request when the server listens on a non-loopback address."""

from __future__ import annotations

import urllib.error
import urllib.request
from argparse import Namespace
from pathlib import Path

import pytest

from tests.web.conftest import start_server
from tests.web.inprocess import serving
from web.security import TOKEN_COOKIE, is_loopback, resolve_auth_token

EVIL = "http://evil.example"


# -- cross-site requests -----------------------------------------------------------------------

def test_cross_origin_post_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path / "base") as (client, _):
        reply = client.post("/api/settings/x", data=b"1", headers={"Origin": EVIL})
        assert reply.status == 403
        assert "--enable-cors-header" in reply.text
        assert client.get("/api/settings/x").json() is None


def test_cross_site_fetch_metadata_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path / "base") as (client, _):
        headers = {"Sec-Fetch-Site": "cross-site"}
        assert client.post("/api/free", json={}, headers=headers).status == 403
        assert client.delete("/api/userdata/a.json", headers=headers).status == 403


def test_same_origin_and_script_posts_are_allowed(tmp_path: Path) -> None:
    with serving(tmp_path / "base") as (client, _):
        host = f"http://{client.client.host}:{client.client.port}"
        assert client.post("/api/settings/x", data=b"1", headers={"Origin": host}).status == 200
        assert client.post("/api/settings/y", data=b"2").status == 200


def test_cross_origin_get_is_not_blocked_but_gets_no_cors_header(tmp_path: Path) -> None:
    with serving(tmp_path / "base") as (client, _):
        reply = client.get("/api/system_stats", headers={"Origin": EVIL})
        assert reply.status == 200
        assert "Access-Control-Allow-Origin" not in reply.headers


def test_cross_origin_websocket_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path / "base") as (client, _):
        assert client.websocket_status("/ws", headers={"Origin": EVIL}) == 403
        assert client.websocket_status("/ws") == 101


def test_enable_cors_header_allows_any_origin(tmp_path: Path) -> None:
    with serving(tmp_path / "base", "--enable-cors-header") as (client, _):
        reply = client.post("/api/settings/x", data=b"1", headers={"Origin": EVIL})
        assert reply.status == 200
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        preflight = client.request("OPTIONS", "/api/prompt", headers={
            "Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert preflight.status == 200
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


def test_enable_cors_header_with_an_origin_allows_only_that_one(tmp_path: Path) -> None:
    good = "http://good.example"
    with serving(tmp_path / "base", "--enable-cors-header", good) as (client, _):
        reply = client.post("/api/settings/x", data=b"1", headers={"Origin": good})
        assert reply.status == 200
        assert reply.headers["Access-Control-Allow-Origin"] == good
        assert client.post("/api/settings/x", data=b"1", headers={"Origin": EVIL}).status == 403


# -- the token ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("localhost", True), ("127.0.0.1,::1", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("127.0.0.1,0.0.0.0", False),
    ("myhost.lan", False)])
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_loopback_listen_needs_no_token() -> None:
    assert resolve_auth_token(Namespace(listen="127.0.0.1", auth_token=None, port=8188)) is None


def test_non_loopback_listen_generates_and_keeps_a_token(capsys: pytest.CaptureFixture) -> None:
    args = Namespace(listen="0.0.0.0", auth_token=None, port=8188)
    token = resolve_auth_token(args)
    assert token and len(token) >= 24
    assert token in capsys.readouterr().err
    assert resolve_auth_token(args) == token == args.auth_token


def test_non_loopback_listen_without_token_is_refused(tmp_path: Path) -> None:
    with serving(tmp_path / "base", "--listen", "0.0.0.0", "--auth-token", "s3cret") as (client,
                                                                                         _):
        for path in ("/", "/api/object_info", "/api/settings", "/internal/logs"):
            reply = client.get(path)
            assert reply.status == 401, path
            assert "token" in reply.text
        assert client.get("/api/object_info",
                          headers={"Authorization": "Bearer wrong"}).status == 401
        assert client.websocket_status("/ws") == 401


def test_token_in_header_query_or_cookie_is_accepted(tmp_path: Path) -> None:
    with serving(tmp_path / "base", "--listen", "0.0.0.0", "--auth-token", "s3cret") as (client,
                                                                                         _):
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.get("/api/object_info", headers=bearer).status == 200
        first = client.get("/?token=s3cret")
        assert first.status == 200
        cookie = first.headers["Set-Cookie"]
        assert cookie.startswith(f"{TOKEN_COOKIE}=s3cret")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # the client keeps the cookie, as the browser does for the editor's later requests
        assert client.get("/api/settings").status == 200
        assert client.websocket_status("/ws") == 101


def test_auth_token_on_loopback_is_enforced_end_to_end(tmp_path: Path) -> None:
    server = start_server(tmp_path / "base", "--auth-token", "s3cret",
                          wait_path="/api/object_info?token=s3cret")
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url + "/api/object_info", timeout=30)
        assert refused.value.code == 401
        request = urllib.request.Request(server.url + "/api/object_info",
                                         headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
    finally:
        server.stop()
