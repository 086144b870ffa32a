"""Bearer tokens: read from a file or an environment variable, compared in constant time."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

#: Environment variable the server reads its tokens from (comma-separated) when no file is given.
SERVER_TOKENS_ENV = "VEIL_SERVE_TOKENS"
#: Environment variable ``veil query`` reads its one token from when no file is given.
CLIENT_TOKEN_ENV = "VEIL_TOKEN"
MIN_TOKEN_CHARS = 16


def _check(token: str, where: str) -> bytes:
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{where}: a token must have at least {MIN_TOKEN_CHARS} characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{where}: a token must be printable ASCII without spaces")
    return token.encode()


def load_tokens(token_file: str | Path | None = None, *, env: str = SERVER_TOKENS_ENV) -> tuple[bytes, ...]:
    """Tokens from ``token_file`` (one a line; blank lines and ``#`` comments skipped), else from the
    environment variable ``env`` (comma-separated). At least one is required; each is checked."""
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: token file not found")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a readable text file of tokens ({err})") from err
        raw, where = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")], str(path)
    else:
        raw, where = [t.strip() for t in os.environ.get(env, "").split(",") if t.strip()], f"${env}"
    if not raw:
        raise ValueError(f"no bearer token: pass --token-file or set {env}")
    return tuple(_check(t, where) for t in raw)


def authorize(header: str | None, tokens: tuple[bytes, ...]) -> int:
    """HTTP status for an ``Authorization`` header: 200 (a known token), 401 (none or not Bearer), 403 (wrong).

    Every token is compared (``hmac.compare_digest``), so the time taken does not tell which, or how much
    of one, matched.
    """
    if not header or not header.startswith("Bearer "):
        return 401
    given = header[len("Bearer ") :].strip().encode("utf-8", "replace")
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given, token)
    return 200 if ok else 403
