"""CURVE: keygen files, a real CURVE server on loopback, and who it lets in."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from npctalk.client import Client, CurveClientKeys, ServerUnavailable
from npctalk.engine.errors import ConfigError
from npctalk.engine.model import Model
from npctalk.engine.security import CurveServerConfig, generate, load
from npctalk.engine.server import Server, ServerConfig
from server_process import free_tcp_endpoint

MIRA = {"name": "Mira", "role": "a herbalist"}


def serve_in_thread(model: Model, config: ServerConfig) -> Iterator[Server]:
    server = Server(model, config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.request_stop()
        thread.join(timeout=20)
        assert not thread.is_alive(), "the CURVE server did not stop"


@pytest.fixture(scope="module")
def curve_server(gpt2_bundle: Path, curve_keys: Path) -> Iterator[Server]:
    config = ServerConfig(bind=free_tcp_endpoint(), curve=CurveServerConfig(curve_keys / "server.key_secret", curve_keys / "allowed"))
    yield from serve_in_thread(Model(gpt2_bundle, provider="cpu", intra_op_threads=1), config)


def test_keygen_writes_a_private_secret_file_and_never_overwrites(tmp_path: Path) -> None:
    public, secret = generate(tmp_path, "npc-host")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair, public_only = load(secret, need_secret=True), load(public, need_secret=False)
    assert pair.public == public_only.public and len(pair.secret or b"") == 40 and public_only.secret is None
    with pytest.raises(ConfigError, match="Refusing to overwrite"):
        generate(tmp_path, "npc-host")
    with pytest.raises(ConfigError, match="holds no secret key"):
        load(public, need_secret=True)
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.key_secret", need_secret=True)
    (tmp_path / "junk.key").write_text("not a certificate")
    with pytest.raises(ConfigError, match="junk.key"):
        load(tmp_path / "junk.key", need_secret=False)


def test_an_allowed_client_talks_over_curve(curve_server: Server, curve_keys: Path) -> None:
    curve = CurveClientKeys.from_files(curve_keys / "server.key", curve_keys / "alice.key_secret")
    with Client(curve_server.endpoint, timeout=5.0, curve=curve) as client:
        client.upsert_npc("mira", MIRA)
        result = client.say("mira", "Hello over an encrypted line", max_new_tokens=6, temperature=0).wait()
        assert result.usage.completion_tokens >= 1 and result.finish_reason in ("stop", "length")


@pytest.mark.parametrize("who", ["no keys", "unlisted key", "wrong server key"])
def test_others_get_no_connection(curve_server: Server, curve_keys: Path, who: str) -> None:
    curve = {
        "no keys": None,
        "unlisted key": CurveClientKeys.from_files(curve_keys / "server.key", curve_keys / "mallory.key_secret"),
        "wrong server key": CurveClientKeys.from_files(curve_keys / "mallory.key", curve_keys / "alice.key_secret"),
    }[who]
    with Client(curve_server.endpoint, timeout=0.5, retries=1, curve=curve) as client:
        with pytest.raises(ServerUnavailable):
            client.ping()


def test_cli_keygen_and_serve_flag_errors(tmp_path: Path, gpt2_bundle: Path) -> None:
    cli = [sys.executable, "-m", "npctalk.engine.cli"]
    made = subprocess.run([*cli, "keygen", str(tmp_path), "--name", "host"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and (tmp_path / "host.key").is_file() and (tmp_path / "host.key_secret").is_file()
    cases = {
        ("--curve-clients", str(tmp_path)): "needs --curve-secret-key",
        ("--curve-secret-key", str(tmp_path / "host.key")): "holds no secret key",
        ("--curve-secret-key", str(tmp_path / "host.key_secret"), "--curve-clients", str(tmp_path / "nowhere")):
            "is not a folder",
    }
    for flags, message in cases.items():
        run = subprocess.run([*cli, "serve", "--model", str(gpt2_bundle), "--provider", "cpu", "--bind",
                              free_tcp_endpoint(), *flags], capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and message in run.stderr, (flags, run.stderr)
