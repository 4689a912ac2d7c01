"""Start and stop a real tritonserver for a model repository: `zooter serve` and the tests use this.

Finds `tritonserver` on PATH, else the one inside the nvidia-pytriton wheel. The wheel ships the
python backend without a stub; the stub must match the Python that will run the models (this
one), so the backends folder is copied into a private work folder with the right stub beside
libtriton_python.so. The wheel's own folder is never written to: it is shared by everyone using
the venv. The python-backend stub runs the `python3` first on PATH, so the child gets this
interpreter's bin folder first on PATH.

Safe by default (docs/triton.md, "Security"): HTTP, gRPC and metrics bind 127.0.0.1 unless a host
is given; model control (load, unload, upload through the repository API) is off unless asked for,
and the repository, logging and trace APIs are always restricted to requests that carry the
launcher's random control key in the `zooter-control-key` header.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from zooter.runtime.errors import UserError


@dataclass
class TritonInstall:
    """Where the server binary, its shared libraries and its backends are."""

    binary: Path
    lib_dir: Path | None = None        # extra LD_LIBRARY_PATH entry (the wheel's bundled libraries)
    backends: Path | None = None       # backends folder to copy and complete with the stub
    stub: Path | None = None           # triton_python_backend_stub for this Python
    from_wheel: bool = False


def _pytriton_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_tritonserver() -> TritonInstall:
    """tritonserver on PATH (a Triton container or install), else the nvidia-pytriton wheel's."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(binary=Path(on_path))
    root = _pytriton_root()
    if root is None:
        raise UserError("no tritonserver on PATH and nvidia-pytriton is not installed (pip install 'zooter[triton]')")
    dist = root / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file():
        raise UserError(f"{binary}: nvidia-pytriton has no tritonserver binary")
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton ships no python-backend stub for Python {version} ({stub})")
    return TritonInstall(binary=binary, lib_dir=root.parent / "nvidia_pytriton.libs",
                         backends=dist / "backends", stub=stub, from_wheel=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_backends(install: TritonInstall, workdir: Path) -> Path:
    """A copy of the wheel's backends folder with this Python's stub next to libtriton_python.so."""
    dest = workdir / "backends"
    shutil.copytree(install.backends, dest, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, dest / "python" / "triton_python_backend_stub")
    return dest


def _stop_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM if the launcher dies (even by SIGKILL), so no
    tritonserver is left holding its ports. Elsewhere a no-op. Linux ties this to the thread that
    started the child: call start() from a thread that outlives the server (the main thread)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


LOCALHOST = "127.0.0.1"
# Control APIs: loading models runs their code; logging and trace settings choose files to write.
RESTRICTED_APIS = "model-repository,logging,trace"


@dataclass
class TritonServer:
    """A tritonserver child process. Use as a context manager, or start()/stop()."""

    repository: Path
    extra_repositories: Sequence[Path] = ()   # e.g. the TensorRT-LLM candidates' repository
    http_port: int = 0                 # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    host: str = LOCALHOST              # the address every endpoint binds; 0.0.0.0 opens them to the network
    model_control: bool = False        # explicit model control: load/unload through the API, behind control_key
    control_key: str | None = None     # for the restricted repository and logging APIs; None: a random one
    load_models: Sequence[str] = ("*",)
    log_file: Path | None = None
    log_verbose: int = 0
    extra_args: Sequence[str] = ()
    process: subprocess.Popen | None = field(default=None, init=False)
    _workdir: Path | None = field(default=None, init=False)

    def __post_init__(self):
        self.repository = Path(self.repository).resolve()
        self.extra_repositories = [Path(p).resolve() for p in self.extra_repositories]
        for repo in [self.repository, *self.extra_repositories]:
            if not repo.is_dir():
                raise UserError(f"{repo}: no such model repository")
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise UserError(f"{name.replace('_', '-')} must be a port number (0-65535), got {port!r}")
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        # Always a key: the logging API (log files, verbosity) is a control API even without model control.
        self.control_key = self.control_key or secrets.token_urlsafe(32)
        if self.control_key and not all(c.isalnum() or c in "-_" for c in self.control_key):
            raise UserError("the control key may hold only letters, digits, '-' and '_'")

    # --- endpoints -------------------------------------------------------------------------
    @property
    def client_host(self) -> str:
        """Where this machine's clients reach the server: the bind address, or loopback for a wildcard."""
        return LOCALHOST if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.metrics_port}/metrics"

    def bound(self) -> dict[str, str]:
        """The addresses the server listens on, as the banner prints them."""
        return {"http": f"{self.host}:{self.http_port}", "grpc": f"{self.host}:{self.grpc_port}",
                "metrics": f"{self.host}:{self.metrics_port}"}

    # --- lifecycle -------------------------------------------------------------------------
    def command(self, install: TritonInstall, backends: Path | None) -> list[str]:
        cmd = [str(install.binary), f"--model-repository={self.repository}",
               *(f"--model-repository={repo}" for repo in self.extra_repositories),
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}", "--allow-cpu-metrics=true",
               "--allow-gpu-metrics=false", f"--log-verbose={self.log_verbose}",
               # Triton's own default: long enough for every python stub to finalize on a loaded
               # machine (a shorter one cut the BLS model's unload short: docs/triton.md), short
               # enough that a stop never hangs on a stuck generation.
               "--exit-timeout-secs=30"]
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        if self.model_control:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={name}" for name in self.load_models]
        if self.control_key:
            # Every model-repository (index, load, unload, upload), logging and trace call needs the key.
            from zooter.serving.triton_client import CONTROL_HEADER

            cmd += [f"--http-restricted-api={RESTRICTED_APIS}:{CONTROL_HEADER}={self.control_key}",
                    f"--grpc-restricted-protocol={RESTRICTED_APIS}:{CONTROL_HEADER}={self.control_key}"]
        return cmd + list(self.extra_args)

    def environment(self, install: TritonInstall) -> dict:
        env = os.environ.copy()
        # The python backend starts `python3` from PATH for every model: it must be this interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if install.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(install.lib_dir), env.get("LD_LIBRARY_PATH")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def start(self, timeout: float = 180.0) -> "TritonServer":
        install = find_tritonserver()
        self._workdir = Path(tempfile.mkdtemp(prefix="zooter-triton-"))
        backends = _private_backends(install, self._workdir) if install.from_wheel else None
        log = open(self.log_file, "ab") if self.log_file else open(self._workdir / "tritonserver.log", "ab")
        self.process = subprocess.Popen(self.command(install, backends), env=self.environment(install),
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_stop_with_parent)
        log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def log_path(self) -> Path | None:
        if self.log_file:
            return Path(self.log_file)
        return self._workdir / "tritonserver.log" if self._workdir else None

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"tritonserver exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise UserError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM (Triton finishes in-flight requests and unloads models), SIGKILL if it hangs
        past its own 30 s exit timeout."""
        code = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        if self._workdir is not None and not self.log_file:
            # Keep the log beside nothing else: the private backends copy is not needed any more.
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    # --- model control (explicit mode, with the control key) -------------------------------------
    def load(self, model: str) -> None:
        from zooter.serving.triton_client import load_model

        load_model(self.http_url, model, self.control_key)

    def unload(self, model: str) -> None:
        from zooter.serving.triton_client import unload_model

        unload_model(self.http_url, model, self.control_key)


class StopRequested(BaseException):
    """Ctrl-C or SIGTERM arrived: stop the server (a BaseException, so no `except Exception` swallows it)."""


def _raise_stop(signum, _frame):
    raise StopRequested(signal.Signals(signum).name)


def serve_forever(server: TritonServer, timeout: float = 300.0, on_ready=None) -> int:
    """Start the server, call on_ready(server), run until Ctrl-C or SIGTERM, stop cleanly.

    The signal handlers are installed before the server starts, so a stop that arrives while the
    models load still shuts the child down. Returns 0 after a requested stop, else the server's code.
    """
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start(timeout)
            if on_ready is not None:
                on_ready(server)
            while server.process.poll() is None:
                time.sleep(0.2)
        except StopRequested as stop:
            print(f"{stop}: stopping tritonserver ...", file=sys.stderr, flush=True)
            code = server.stop()
            print(f"tritonserver stopped (exit code {code})", file=sys.stderr, flush=True)
            return 0
        print(f"tritonserver exited on its own (code {server.process.returncode}):\n{server.log_tail()}", file=sys.stderr)
        return server.process.returncode or 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
