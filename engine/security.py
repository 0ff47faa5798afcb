"""CURVE authentication and encryption for a server reachable from other machines.

ZeroMQ's CURVE mechanism (CurveZMQ: Curve25519 keys, every message encrypted) needs a key pair for
the server and one per client. Keys live in ZeroMQ's certificate files, which ``npctalk keygen``
writes::

    NAME.key          public key  (give the server's to every client; give each client's to the server)
    NAME.key_secret   public and secret key (never leaves its owner; written with mode 0600)

Server (``npctalk serve --curve-secret-key server.key_secret [--curve-clients DIR]``): with
``--curve-clients`` only clients whose public ``.key`` file is in DIR may connect (checked by a ZAP
handler thread, pyzmq's ``ThreadAuthenticator``); without it any client that knows the server's
public key may connect, and the traffic is still encrypted.

Client (``Client(endpoint, curve=CurveClientKeys.from_files("server.key", "me.key_secret"))``):
knows the server's public key, so it cannot be fooled by another server on that address.

A client without keys talking to a CURVE server (or the reverse) gets no connection at all: libzmq
drops the handshake, and the client's timeout reports the server as unavailable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyPair:
    """Z85-encoded Curve25519 keys (40 bytes each); ``secret`` is None for a public-only file."""

    public: bytes
    secret: bytes | None


def generate(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory``; returns both paths.

    Refuses to overwrite an existing pair (replacing keys locks out every client that has the old one).
    """
    folder = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"Key name {name!r} must be a plain file name such as 'server' or 'player1'.")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing:
        raise ConfigError(f"Refusing to overwrite {existing}; delete them first if you really mean to replace the keys.")
    folder.mkdir(parents=True, exist_ok=True)
    made_public, made_secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(made_secret, 0o600)
    log.info("Wrote %s (share it) and %s (keep it private).", made_public, made_secret)
    return Path(made_public), Path(made_secret)


def load(path: str | Path, *, need_secret: bool) -> KeyPair:
    """Read a certificate file; ``ConfigError`` naming the file when it is missing or not a key file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"CURVE key file {file} does not exist; create keys with `npctalk keygen DIR --name NAME`.")
    try:
        public, secret = zmq.auth.load_certificate(str(file))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not a ZeroMQ certificate file ({exc}).") from None
    if public is None or len(public) != 40:
        raise ConfigError(f"{file} holds no valid public key.")
    if need_secret and (secret is None or len(secret) != 40):
        raise ConfigError(f"{file} holds no secret key; pass the NAME.key_secret file, not the public NAME.key.")
    return KeyPair(public, secret)


@dataclass(frozen=True)
class CurveServerConfig:
    """The server's secret key file and, optionally, the folder of allowed clients' public keys."""

    secret_key_file: Path
    clients_dir: Path | None = None


class CurveServer:
    """Makes ROUTER sockets CURVE servers; runs the ZAP handler while client keys are enforced."""

    def __init__(self, context: zmq.Context, config: CurveServerConfig) -> None:
        self.keys = load(config.secret_key_file, need_secret=True)
        self._authenticator: ThreadAuthenticator | None = None
        if config.clients_dir is not None:
            folder = Path(config.clients_dir)
            if not folder.is_dir():
                raise ConfigError(f"--curve-clients {folder} is not a folder of client public keys (NAME.key files).")
            allowed = sorted(folder.glob("*.key"))
            if not allowed:
                raise ConfigError(f"--curve-clients {folder} holds no NAME.key files, so no client could connect.")
            self._authenticator = ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".zap"))
            self._authenticator.start()
            self._authenticator.configure_curve(domain="*", location=str(folder))
            log.info("CURVE: %d client key(s) allowed from %s.", len(allowed), folder)
        else:
            log.info("CURVE: encrypted; any client that knows the server's public key may connect.")

    def apply(self, sock: zmq.Socket) -> None:
        """Before bind: make ``sock`` a CURVE server with this key pair."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


@dataclass(frozen=True)
class CurveClientKeys:
    """What a client needs: the server's public key and its own key pair (all Z85, 40 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key_file: str | Path, client_secret_file: str | Path) -> CurveClientKeys:
        """The server's ``NAME.key`` and this client's ``NAME.key_secret``."""
        server = load(server_key_file, need_secret=False)
        own = load(client_secret_file, need_secret=True)
        assert own.secret is not None  # load() checked it
        return cls(server.public, own.public, own.secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Before connect: make ``sock`` a CURVE client of that server."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
