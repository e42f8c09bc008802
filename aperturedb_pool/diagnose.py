"""Telling connect failures that retrying cannot fix from those it can.

A connector that cannot be opened because of its configuration (TLS on one
side only, a certificate that does not verify, a wrong password, a host name
that does not resolve) fails the same way on every attempt: the pool should
say so at once, in the user's terms, instead of retrying until a timeout
blames an "unreachable" server.  :func:`classify_connect_error` turns such a
failure into one permanent :class:`~aperturedb_pool.errors.ConnectFailed`
whose message names the cause and the fix; anything else (refused, reset,
timed out: a server restarting) is left to the pool's backoff.

Each fix is written for the four ways a connector is configured: the SDK's
``Connector`` arguments, Flask's ``APERTUREDB_*`` keys, Django's
``APERTUREDB`` dict, and the ``aperturedb-pool`` command line.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Iterator

from aperturedb_pool.errors import ConnectFailed

__all__ = ["classify_connect_error", "authentication_failed", "setting"]

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH (and IP address mismatch).
_HOST_MISMATCH = (62, 64)
# Certificate dates.
_EXPIRED = (9, 10)


def setting(arg: str, value: str) -> str:
    """How to set one ``Connector`` argument, in each configuration's terms."""
    key = arg.upper()
    flag = {"use_ssl": "--tls" if value == "True" else "no --tls",
            "ca_cert": "--ca-cert FILE", "host": "--host", "port": "--port",
            "user": "--user", "password": "--password"}.get(arg, "")
    lit = value if value in ("True", "False") or value.isdigit() else f"\"{value}\""
    cli = f"; {flag} on the aperturedb-pool command line" if flag else ""
    return (f"Connector(..., {arg}={lit}) (APERTUREDB_{key}={lit} in Flask, \"{key}\": {lit} "
            f"in Django's APERTUREDB{cli})")


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _use_ssl(conn: Any) -> bool:
    cfg = getattr(conn, "config", None)
    value = getattr(conn, "use_ssl", getattr(cfg, "use_ssl", True))
    return bool(value)


def _permanent(message: str, original: BaseException) -> ConnectFailed:
    err = ConnectFailed(message, permanent=True)
    # The SDK's own exception (its message may blame the wrong thing) stays
    # reachable for debugging without being printed as a second error.
    err.original = original  # type: ignore[attr-defined]
    return err


def classify_connect_error(e: BaseException, conn: Any, where: str) -> ConnectFailed | None:
    """A permanent ``ConnectFailed`` naming the cause and the fix, or None
    when ``e`` (raised while opening ``conn``'s connection) may go away on
    its own and is worth retrying."""
    host = getattr(conn, "host", None)
    for err in _chain(e):
        if isinstance(err, ssl.SSLCertVerificationError):
            return _certificate(err, e, conn, where, host)
        if isinstance(err, FileNotFoundError):
            ca = getattr(getattr(conn, "config", None), "ca_cert", None) or err.filename
            return _permanent(
                f"cannot connect to {where}: the CA certificate file {ca!r} does not exist. "
                f"Fix the path: {setting('ca_cert', '/path/to/ca.pem')}", e)
        if isinstance(err, socket.gaierror):
            return _permanent(
                f"cannot connect to {where}: the host name {host!r} does not resolve "
                f"({err.strerror}). Check the host: {setting('host', 'db.example.com')}", e)
        if "did not accept protocol" in str(err):
            if _use_ssl(conn):
                return _permanent(
                    f"cannot connect to {where}: the server does not accept TLS (it runs "
                    f"without it, as `aperturedb-pool serve` without --tls does) and this "
                    f"connector asks for TLS (use_ssl=True is the SDK's default). Connect "
                    f"without TLS: {setting('use_ssl', 'False')}; or start the server with "
                    f"TLS", e)
            return _permanent(
                f"cannot connect to {where}: the server requires TLS (as real ApertureDB "
                f"servers and `aperturedb-pool serve --tls` do) and this connector has "
                f"use_ssl=False. Use TLS: {setting('use_ssl', 'True')}, with the server's CA "
                f"certificate if it is private: {setting('ca_cert', '/path/to/ca.pem')}", e)
    return None


def _certificate(err: ssl.SSLCertVerificationError, e: BaseException, conn: Any, where: str,
                 host: Any) -> ConnectFailed:
    code = getattr(err, "verify_code", None)
    why = getattr(err, "verify_message", None) or str(err)
    if code in _HOST_MISMATCH:
        return _permanent(
            f"cannot connect to {where}: the server's certificate is not valid for the host "
            f"name {host!r} ({why}); the CA is trusted. Connect with a host name the "
            f"certificate names: {setting('host', 'name-in-the-certificate')}, or turn the "
            f"host name check off (not recommended): {setting('verify_hostname', 'False')}", e)
    if code in _EXPIRED:
        return _permanent(
            f"cannot connect to {where}: the server's certificate is outside its validity "
            f"dates ({why}). Renew the server's certificate (or check this machine's clock)", e)
    ca = getattr(getattr(conn, "config", None), "ca_cert", None)
    trusted = f"the CA in {ca!r}" if ca else "the system's CA certificates"
    return _permanent(
        f"cannot connect to {where}: the server's certificate is signed by a CA that "
        f"{trusted} do not include ({why}); the host name was not the problem. Pass the "
        f"server's CA certificate: {setting('ca_cert', '/path/to/ca.pem')} (`aperturedb-pool "
        f"serve --tls` prints the path of the CA it generated)", e)


def authentication_failed(e: BaseException, conn: Any, where: str) -> ConnectFailed:
    """The permanent error for a login the server refused (``e`` carries the
    server's reason; the password is never part of the message)."""
    cfg = getattr(conn, "config", None)
    user = getattr(cfg, "username", None)
    how = "token" if getattr(cfg, "token", None) and not getattr(cfg, "password", None) \
        else "password"
    return _permanent(
        f"cannot use {where}: the server refused the login of user {user!r} ({e}). Check "
        f"the user name and {how}: {setting('user', 'NAME')} and "
        f"{setting(how, '...')}", e)
