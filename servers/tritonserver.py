"""Start and stop a real tritonserver for a model repository: `zooter serve` and the tests use this.

Finds `tritonserver` on PATH, else the one inside the nvidia-pytriton wheel. The wheel ships the
python backend without a stub; the stub must match the Python that will run the models (this
one), so the backends folder is copied into a private work folder with the right stub beside
libtriton_python.so. The wheel's own folder is never written to: it is shared by everyone using
the venv. The python-backend stub runs the `python3` first on PATH, so the child gets this
interpreter's bin folder first on PATH.

Safe by default (docs/triton.md, "Security"): HTTP, gRPC and metrics bind 127.0.0.1 unless a host
is given; model control (load, unload, upload through the repository API) is off unless asked for,
and the repository, logging, trace and shared-memory APIs are always restricted to requests that
carry the launcher's random control key in the `zooter-control-key` header.

Hardened against its own front end (docs/triton.md, "Oversized requests"): tritonserver's HTTP
threads get stacks large enough for libevhtp's form-body parser, which puts two copies of a
`application/x-www-form-urlencoded` body on the stack (a 5 MB body crashed an 8 MiB stack).

Leaves nothing behind: a stop waits for Triton's own exit timeout, then kills the process group;
the work folder and the python backend's /dev/shm regions go with the server, and whatever a
crashed or killed server left is swept by the next start (`sweep_leftovers`), never a live one's.
"""

from __future__ import annotations

import json
import os
import resource
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

# libevhtp (tritonserver's HTTP parser) copies a form-encoded body twice onto the HTTP thread's stack
# (evhtp_parse_query_wflags: `char key_buf[len + 1]; char val_buf[len + 1];`); threads get
# RLIMIT_STACK-sized stacks, 8 MiB by default, so a body over ~4 MB crashed the server. With 1 GiB
# (address space: a page costs memory only once a big body touches it) bodies up to ~511 MB parse and
# reach the models' own limits. docs/triton.md, "Oversized requests".
HTTP_THREAD_STACK = 1 << 30
WORKDIR_PREFIX = "zooter-triton-"
OWNER_FILE = "owner.json"
SHM_PREFIX = "triton_python_backend_shm_region_"    # the python backend's default region names
# The python backend makes an (empty, unless EXECUTION_ENV_PATH is used) /tmp/python_env_XXXXXX at start and
# removes it at a clean exit; the path is fixed in libtriton_python.so, so a killed server leaves it behind.
PYTHON_ENV_GLOB = "/tmp/python_env_*"
SHM_ROOT = Path("/dev/shm")
FRESH_S = 60.0      # younger leftovers may be a server starting right now: left for the next sweep


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): a PID plus this names one
    process, even after the PID is reused. None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner) -> bool:
    """owner: [pid, start time] as written by _identity()."""
    try:
        pid, started = owner
        return started is not None and _start_time(int(pid)) == started
    except (TypeError, ValueError):
        return False


def _identity(pid: int) -> list:
    return [pid, _start_time(pid)]


def _references(proc: Path) -> set[str]:
    """The paths a process holds: open files, its folder, its mappings and its command-line arguments."""
    names: set[str] = set()
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:              # gone meanwhile, or another user's
        fds = []
    for link in (*fds, proc / "cwd"):
        try:
            names.add(os.readlink(link))
        except OSError:          # closed meanwhile
            pass
    try:
        names.update(line.split(None, 5)[5] for line in (proc / "maps").read_text().splitlines()
                     if line.count(" ") >= 5 and "/" in line)
        names.update((proc / "cmdline").read_bytes().decode(errors="replace").replace("=", "\0").split("\0"))
    except OSError:
        pass
    return names


def _in_use(paths: set[str]) -> set[str]:
    """Which of `paths` (files or folders) some running process holds (see _references)."""
    used: set[str] = set()
    for proc in Path("/proc").glob("[0-9]*") if paths else ():
        names = _references(proc)
        for path in paths - used:
            if any(name == path or name.startswith(path + "/") for name in names):
                used.add(path)
    return used


def sweep_leftovers(tmp_root: Path | None = None, shm_root: Path = SHM_ROOT, now: float | None = None) -> list[Path]:
    """Remove what dead Triton servers left: work folders `zooter-triton-*` in the temporary folder whose
    owner (the launcher and its tritonserver, by PID and start time) is gone, and python-backend
    /dev/shm regions no process has open or mapped. Only this user's, never a live server's, and
    nothing younger than a minute. Returns what was removed."""
    tmp_root = Path(tmp_root or tempfile.gettempdir())
    now = time.time() if now is None else now
    uid = os.getuid()

    def ours_and_settled(path: Path) -> bool:
        try:
            st = path.lstat()
        except OSError:
            return False
        return st.st_uid == uid and now - st.st_mtime >= FRESH_S

    candidates, unmarked = [], []
    # ".zooter-triton-*": a work folder still being set up, left so only by a launcher that died then
    for folder in sorted([*tmp_root.glob(WORKDIR_PREFIX + "*"), *tmp_root.glob("." + WORKDIR_PREFIX + "*")]):
        if not folder.is_dir() or folder.is_symlink() or not ours_and_settled(folder):
            continue
        try:
            owners = json.loads((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            unmarked.append(folder)      # from a launcher before owner files: judged by /proc alone
            continue
        if not any(_alive(owner) for owner in owners.values() if owner):
            candidates.append(folder)
    regions = [p for p in sorted(shm_root.glob(SHM_PREFIX + "*")) if p.is_file() and ours_and_settled(p)]
    used = _in_use({str(p) for p in (*candidates, *unmarked, *regions)})
    removed = []
    for path in (*candidates, *unmarked, *regions):
        if str(path) in used:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(path)
    return removed


def _group_running(pgid: int) -> bool:
    """Whether a process of this group still runs (zombies, dead but not yet reaped, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _python_envs() -> set[str]:
    import glob

    return set(glob.glob(PYTHON_ENV_GLOB))


def _stack_limit(wanted: int) -> int | None:
    """The soft RLIMIT_STACK to give tritonserver, or None to leave it: never above the hard limit, and
    not under strict overcommit (mode 2 charges every thread's whole stack; threads would fail)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    try:
        if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2":
            return None
    except OSError:
        pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    # An unlimited soft limit is no better: libc then gives threads 2 MiB.
    return target if soft == resource.RLIM_INFINITY or target > soft else None


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
    exit_timeout: int = 30             # Triton's own: how long a stop waits for in-flight work and unloads
    http_stack_bytes: int = HTTP_THREAD_STACK
    extra_args: Sequence[str] = ()
    process: subprocess.Popen | None = field(default=None, init=False)
    _workdir: Path | None = field(default=None, init=False)
    _regions: set = field(default_factory=set, init=False)     # this server's /dev/shm regions, seen running
    _envs: set = field(default_factory=set, init=False)        # python_env folders that appeared as it started

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
               # Triton's own default (30): long enough for every python stub to finalize on a loaded
               # machine (a shorter one cut the BLS model's unload short: docs/triton.md), short
               # enough that a stop never hangs on a stuck generation.
               f"--exit-timeout-secs={self.exit_timeout}"]
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        if self.model_control:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={name}" for name in self.load_models]
        if self.control_key:
            # Every model-repository (index, load, unload, upload), logging, trace and shared-memory
            # (register, unregister, status; system and CUDA) call needs the key.
            from zooter.serving.triton_client import CONTROL_HEADER, RESTRICTED_APIS

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

    def _make_workdir(self) -> Path:
        """A private work folder that appears under its final name only with its owner file inside, so a
        sweep running at the same moment never takes it for a dead server's."""
        staging = Path(tempfile.mkdtemp(prefix="." + WORKDIR_PREFIX))
        self._write_owner(staging)
        final = staging.with_name(staging.name[1:])
        staging.rename(final)
        return final

    def _write_owner(self, folder: Path) -> None:
        owners = {"launcher": _identity(os.getpid()),
                  "server": _identity(self.process.pid) if self.process is not None else None}
        (folder / OWNER_FILE).write_text(json.dumps(owners) + "\n")

    def start(self, timeout: float = 180.0) -> "TritonServer":
        install = find_tritonserver()
        self._workdir = self._make_workdir()
        backends = _private_backends(install, self._workdir) if install.from_wheel else None
        log = open(self.log_file, "ab") if self.log_file else open(self._workdir / "tritonserver.log", "ab")
        stack = _stack_limit(self.http_stack_bytes)
        envs_before = _python_envs()

        def prepare_child():
            _stop_with_parent()
            if stack is not None:      # read once by the child's libc: the default stack of every thread it starts
                resource.setrlimit(resource.RLIMIT_STACK, (stack, resource.getrlimit(resource.RLIMIT_STACK)[1]))

        self.process = subprocess.Popen(self.command(install, backends), env=self.environment(install),
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=prepare_child)
        log.close()
        self._write_owner(self._workdir)
        try:
            self.wait_ready(timeout)
            self._note_regions()
            self._envs = _python_envs() - envs_before
        except BaseException:
            self.close()
            raise
        return self

    @property
    def http_stack(self) -> int:
        """The stack each of tritonserver's threads gets: form bodies up to about half of it parse."""
        stack = _stack_limit(self.http_stack_bytes)
        return stack if stack is not None else resource.getrlimit(resource.RLIMIT_STACK)[0]

    def _note_regions(self) -> None:
        """Remember the /dev/shm regions this server maps, to remove them if it dies without doing so."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            maps = Path(f"/proc/{self.process.pid}/maps").read_text()
        except OSError:
            return
        self._regions.update(line.split(None, 5)[5] for line in maps.splitlines()
                             if line.count(" ") >= 5 and f"/{SHM_PREFIX}" in line)

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

    def stop(self, grace: float = 30.0) -> int | None:
        """Stop the server; always returns with it gone, never raises for a slow one. SIGTERM: Triton
        finishes in-flight requests and unloads the models within its exit timeout, after which it
        exits by itself with code 1 ("failed to stop server: Internal - Exit timeout expired"). A server
        still there `grace` seconds after that (a loaded machine, a hung stub) is killed with its whole
        process group. Returns Triton's exit code: 0 a clean stop, 1 its exit timeout, -9 killed."""
        code = None
        if self.process is not None:
            self._note_regions()
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    code = self.process.wait(self.exit_timeout + grace)
                except subprocess.TimeoutExpired:
                    self._kill_group()
                    code = self.process.wait()
            code = self.process.returncode
            self._kill_group()        # python stubs a crashed or timed-out server left running
        if self._workdir is not None and not self.log_file:
            # Keep the log beside nothing else: the private backends copy is not needed any more.
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        self._remove_regions()
        # The backend removes its folder at a clean exit. After any other end, remove the (empty) ones that
        # appeared while this server started: another server starting in the same second could own one,
        # so never after a clean exit, and never a folder with anything in it.
        for env in self._envs if code != 0 else ():
            try:
                os.rmdir(env)
            except OSError:
                pass
        return code

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 30
        # The stubs' mappings go with them: wait until the group is gone, so the regions are seen unused.
        while _group_running(self.process.pid) and time.monotonic() < deadline:
            self.process.poll()          # reap the server itself
            time.sleep(0.05)

    def _remove_regions(self) -> None:
        """A server that crashed, timed out or was killed leaves its python-backend regions in /dev/shm."""
        leftover = {p for p in self._regions if Path(p).exists()}
        for path in leftover - _in_use(leftover):
            Path(path).unlink(missing_ok=True)

    def close(self) -> int | None:
        """stop(), then remove the work folder (with the log, unless log_file put it elsewhere)."""
        code = self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

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
            for path in sweep_leftovers():
                print(f"removed {path}: left by a Triton server that is gone", file=sys.stderr, flush=True)
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
        server.close()          # idempotent: the work folder, and the /dev/shm regions of a crashed server
        for s, handler in previous.items():
            signal.signal(s, handler)
