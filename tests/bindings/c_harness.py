"""Building the C client and running its programs, shared by the tests in this folder."""

from __future__ import annotations

import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "bindings" / "c"
MIRA = ("--npc", "mira", "--persona-name", "Mira", "--persona-role", "a herbalist")
DONE_MARKER = "\n--- done ---\n"


def _missing_tools() -> str | None:
    for tool in ("cmake", "pkg-config", "cc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    for modules in (("libzmq",), ("msgpack-c", "msgpack")):
        if not any(subprocess.run(["pkg-config", "--exists", m], check=False).returncode == 0 for m in modules):
            return f"pkg-config finds no {' / '.join(modules)} (install libzmq3-dev and libmsgpack-dev)"
    return None


MISSING = _missing_tools()
BUILDABLE = pytest.mark.skipif(MISSING is not None, reason=f"C client not buildable: {MISSING}")


@dataclass(frozen=True)
class Built:
    talk: Path
    talk_cpp: Path | None
    api_checks: Path


def build(folder: Path) -> Built:
    """Configure and build bindings/c into `folder`: warnings as errors, ASan + UBSan (a memory error
    fails the run); then api_checks.c on the library."""
    for command in (["cmake", "-S", str(SOURCE), "-B", str(folder), "-DNPCTALK_WERROR=ON", "-DNPCTALK_SANITIZE=ON"],
                    ["cmake", "--build", str(folder), "-j", "2"]):
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    # api_checks.c exercises the API directly (callbacks that re-enter, close, recover): built on the library
    msgpack_module = next(m for m in ("msgpack-c", "msgpack")
                          if subprocess.run(["pkg-config", "--exists", m], check=False).returncode == 0)
    libs = subprocess.run(["pkg-config", "--libs", "libzmq", msgpack_module], capture_output=True, text=True,
                          check=True).stdout.split()
    command = ["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined", "-g",
               f"-I{SOURCE / 'include'}", str(HERE / "api_checks.c"), str(folder / "libnpctalk.a"),
               *libs, "-o", str(folder / "api_checks")]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    cpp = folder / "talk_cpp"
    return Built(folder / "talk", cpp if cpp.exists() else None, folder / "api_checks")


@dataclass(frozen=True)
class Talked:
    code: int
    stdout: str
    stderr: str
    seconds: float

    def summary(self) -> dict[str, str]:
        """The `done: key=value ...` line talk writes to stderr."""
        line = next(x for x in self.stderr.splitlines() if x.startswith("done: "))
        return dict(pair.split("=", 1) for pair in line[len("done: "):].split())


def talk(built: Built, *args: str, timeout: float = 60.0) -> Talked:
    start = time.monotonic()
    done = subprocess.run([str(built.talk), *args], capture_output=True, check=False, timeout=timeout)
    # decode strictly: the protocol promises no broken UTF-8 in any token
    talked = Talked(done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8"), time.monotonic() - start)
    assert "Sanitizer" not in talked.stderr and "runtime error" not in talked.stderr, talked.stderr
    return talked


def status_numbers(built: Built) -> dict[str, int]:
    listed = talk(built, "--list-status")
    assert listed.code == 0
    return {name: int(number) for number, name in (line.split() for line in listed.stdout.splitlines())}


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"api_checks said nothing for {timeout} s"
    return process.stdout.readline().decode().strip()
