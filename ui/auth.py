"""Who may read the dashboard and send controls: the holder of the token `rollout ui` prints.

- The browser presents the token once in the URL (`/?token=...`): the server answers with an
  HttpOnly, SameSite=Strict session cookie and redirects to the same page without the token, so
  it stays out of the history and of `Referer` headers. Scripts (and Prometheus, when the UI
  listens beyond loopback) send `Authorization: Bearer TOKEN` instead.
- Controls are POSTs that must carry `X-CSRF-Token` (a value derived from the token, embedded
  in the page only for an authenticated browser) and, when the browser sends one, an `Origin`
  equal to the server's own: another site can neither read that value nor forge the header.
- The cookie holds an HMAC of the token, not the token; comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request

TOKEN_ENV = "ROLLOUT_UI_TOKEN"
CSRF_HEADER = "x-csrf-token"


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Auth:
    def __init__(self, token: str, port: int) -> None:
        self._token = token
        self.cookie = f"rollout_ui_{port}"  # cookies ignore ports: one name per server
        self.session = self._derive(b"session")
        self.csrf = self._derive(b"csrf")

    def _derive(self, what: bytes) -> str:
        return hmac.new(self._token.encode(), what, hashlib.sha256).hexdigest()

    def token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self._token.encode())

    def bearer(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(given.strip())

    def authenticated(self, request: Request) -> bool:
        cookie = request.cookies.get(self.cookie)
        if cookie is not None and hmac.compare_digest(cookie.encode(), self.session.encode()):
            return True
        return self.bearer(request)

    def may_send(self, request: Request) -> bool:
        """A POST: a script with the bearer token, or the page with its CSRF value."""
        return self.bearer(request) or (self.authenticated(request) and self._csrf_ok(request))

    def _csrf_ok(self, request: Request) -> bool:
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.csrf.encode()):
            return False
        origin = request.headers.get("origin")
        return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host')}"
