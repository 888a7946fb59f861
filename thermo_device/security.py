"""CURVE authentication and encryption for the daemon (ZeroMQ's "ironhouse" model).

The daemon's ROUTER socket becomes a CURVE server with a long-term key pair; a ZAP handler
(pyzmq's ``zmq.auth.ThreadAuthenticator``) admits only clients whose public key is in an
allow-list directory of ``*.key`` certificates. Everything here is pyzmq/libsodium: no crypto of
our own. A refused client gets no ZeroMQ message at all (the handshake fails before the daemon's
loop sees a frame), so not even ``hello`` or ``info`` leaks to it.

Key files are pyzmq certificates (``zmq.auth.create_certificates``): ``NAME.key`` holds the public
key and can be shared; ``NAME.key_secret`` holds both keys and must stay private.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol.errors import InvalidInputError

log = logging.getLogger("thermo_device.security")
ZAP_DOMAIN = b"thermo-ngd"


class CappedAuthenticator(ThreadAuthenticator):
    """A ZAP handler that first asks ``admit()`` (the daemon's connection cap), then applies the
    usual checks (CURVE allow-list; NULL peers are admitted). libzmq has no accept-time hook: the
    ZAP request at the end of each handshake is the first point where a connection can be refused.
    """

    def __init__(self, ctx: zmq.Context, admit: Callable[[], bool] | None = None) -> None:
        super().__init__(ctx, log=logging.getLogger("thermo_device.security.zap"))
        self.admit = admit
        self.refused = 0

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if self.admit is not None and len(msg) >= 6 and not self.admit():
            self.refused += 1
            log.warning("event=connection_refused reason=connection_cap")
            self._send_zap_reply(msg[1], b"400", b"too many connections")
            return
        await super().handle_zap_message(msg)


def start_connection_cap(ctx: zmq.Context, sock: zmq.Socket, admit: Callable[[], bool]) -> CappedAuthenticator:
    """Plaintext daemons: a ZAP handler for NULL connections that enforces ``admit`` only. Call
    before bind (a socket already listening would handshake without it)."""
    auth = CappedAuthenticator(ctx, admit)
    auth.start()
    sock.zap_domain = ZAP_DOMAIN  # makes libzmq ask ZAP about NULL-mechanism peers too
    return auth


def require_curve() -> None:
    """Fail at start-up, not at the first handshake, on a libzmq built without libsodium."""
    if not zmq.has("curve"):
        raise InvalidInputError(f"this libzmq ({zmq.zmq_version()}) has no CURVE support; "
                                "install a pyzmq wheel built with libsodium")


def load_secret_certificate(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``*.key_secret`` certificate, or a typed error."""
    p = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read the CURVE certificate {p}: {exc}") from None
    if not secret:
        raise InvalidInputError(f"{p} holds no secret key (give the NAME.key_secret file, not NAME.key)")
    if len(public) != 40 or len(secret) != 40:
        raise InvalidInputError(f"{p}: CURVE keys must be 40 Z85 characters")
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # like ssh: warn, because a readable secret lets anyone impersonate this endpoint
        log.warning("event=insecure_key_file path=%s mode=%o (chmod 600 it)", p.name, stat.S_IMODE(mode))
    return public, secret


def count_allowed_keys(directory: str | os.PathLike[str]) -> int:
    """Number of public certificates (``*.key``) in an allow-list directory, or a typed error."""
    d = Path(directory)
    if not d.is_dir():
        raise InvalidInputError(f"allow-list {d} is not a directory of client *.key certificates")
    try:
        n = len(zmq.auth.load_certificates(d))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read the client certificates in {d}: {exc}") from None
    return n


@dataclass
class ServerSecurity:
    """CURVE server settings for one daemon socket (ironhouse: allow-listed client keys only).

    Args:
        secret_key_file: the daemon's ``NAME.key_secret`` certificate.
        allow_dir: directory of allowed clients' public ``*.key`` certificates.
    """

    secret_key_file: Path
    allow_dir: Path
    public_key: bytes = field(init=False, default=b"")
    _secret_key: bytes = field(init=False, default=b"", repr=False)
    _auth: ThreadAuthenticator | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        require_curve()
        self.secret_key_file = Path(self.secret_key_file)
        self.allow_dir = Path(self.allow_dir)
        self.public_key, self._secret_key = load_secret_certificate(self.secret_key_file)
        if count_allowed_keys(self.allow_dir) == 0:
            # an empty allow-list would refuse everybody; that is a set-up mistake, not a policy
            raise InvalidInputError(f"allow-list {self.allow_dir} holds no client *.key certificate")

    def apply(self, ctx: zmq.Context, sock: zmq.Socket, admit: Callable[[], bool] | None = None) -> None:
        """Start the ZAP handler in ``ctx`` and make ``sock`` a CURVE server. Call before bind:
        a socket that is already listening would accept handshakes with no ZAP handler.
        ``admit``: the daemon's connection cap, asked before the allow-list."""
        auth = CappedAuthenticator(ctx, admit)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.allow_dir))
        self._auth = auth
        # No zap_domain: libzmq asks the ZAP handler about every CURVE handshake anyway, and the
        # empty domain is the one configure_curve(domain="*") answers for.
        sock.curve_secretkey = self._secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True
        log.info("event=curve_on server_key=%s allowed_keys=%d", self.public_key.decode(),
                 count_allowed_keys(self.allow_dir))

    def reload(self) -> int:
        """Re-read the allow-list directory (the authenticator caches it); returns the key count.

        Runs from a signal handler, so it never raises: an unreadable directory keeps the old list.
        """
        try:
            n = count_allowed_keys(self.allow_dir)
        except InvalidInputError as exc:
            log.error("event=allow_list_reload_failed reason=%s (keeping the previous list)", exc)
            return -1
        if self._auth is not None:
            self._auth.configure_curve(domain="*", location=str(self.allow_dir))
        log.info("event=allow_list_reloaded allowed_keys=%d", n)
        return n

    def stop(self) -> None:
        """Stop the ZAP thread; must happen before the context is terminated (it holds a socket)."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def keygen(out_dir: str | os.PathLike[str], name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 600) into ``out_dir``.

    Refuses to overwrite an existing key pair unless ``force``: replacing a daemon's key silently
    locks every client out.
    """
    require_curve()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise InvalidInputError(f"key name must be a plain file name, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise InvalidInputError(f"{public} or {secret} already exists (pass --force to replace it)")
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        pub_file, sec_file = zmq.auth.create_certificates(out, name)
    finally:
        os.umask(old)
    os.chmod(sec_file, 0o600)
    os.chmod(pub_file, 0o644)  # the public half is meant to be shared
    return Path(pub_file), Path(sec_file)


def check_remote_bind_allowed(loopback: bool, allow_remote: bool, authenticated: bool) -> str | None:
    """Why a bind must be refused (None when it may go ahead)."""
    if loopback or authenticated or allow_remote:
        return None
    return ("not a loopback address and the daemon has no authentication; start it with CURVE "
            "(--curve-secret-key and --allow-keys) or pass --allow-remote to expose it anyway")


__all__ = ["ServerSecurity", "check_remote_bind_allowed", "count_allowed_keys", "keygen",
           "load_secret_certificate", "require_curve"]
