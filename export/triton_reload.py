"""Swap the router of a running Triton server without dropping requests (`zooter triton reload`).

The new bundle becomes the next version folder of every model that runs the Router (written beside it,
then renamed in, so Triton never sees half a version): `zooter_route`, and `zooter`, which routes in its
own stub in repositories built since it does (a version folder with router.json). The repository API
then loads each again, zooter_route first: Triton loads the new version, sends new requests to it (the
default version policy serves the latest), lets requests in flight finish on the old one, then unloads
it. An older repository's `zooter` asks zooter_route, so it routes with the new router as soon as
zooter_route does. Every answer names the router that chose it. The server must run with model control
(`zooter serve --model-control`), and the load needs its control key.

Only a router that fits the running repository swaps in: the same encoder (zooter.runtime.bundle.swap_problem)
and the same labels (the configs' output widths and `zooter`'s candidate map are built for them; another
label set needs `zooter triton build` with its candidates file). Anything else is refused in one line
before the repository is touched, and the running router keeps serving.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from zooter.export.triton_repo import MARKER, _bundle_files, read_bundle
from zooter.runtime.bundle import BundleError, Manifest, swap_problem
from zooter.runtime.errors import UserError

ROUTE = "zooter_route"
ANSWER = "zooter"       # routes in its own stub in CPU repositories built since issue 24 (router.json in its version)


@dataclass
class Reloaded:
    old: str            # router ids (zooter.runtime.bundle.Manifest.router_id)
    new: str
    version: int        # zooter_route's version folder now serving
    staged: dict = field(default_factory=dict)     # model -> its new version folder, in the order they load

    def describe(self) -> str:
        versions = ", ".join(f"{model} version {folder.name}" for model, folder in self.staged.items())
        return f"router {self.old} -> {self.new} ({versions or f'{ROUTE} version {self.version}'})"


def versions(model: Path) -> list[int]:
    return sorted(int(p.name) for p in model.iterdir() if p.is_dir() and p.name.isdigit())


def stage(repo: str | Path, bundle: str | Path) -> Reloaded:
    """Check the bundle against the repository's latest router; write it as the next version of zooter_route, and
    of zooter where that routes in its own stub. Returns what changes (`staged`: the new version folders).
    UserError (one line) when it does not fit."""
    repo = Path(repo)
    if (repo / MARKER).is_file() and (repo / "zooter_router").is_dir():
        # The ensemble's three models would have to swap as one, and its answers name no router yet; nothing
        # here can load Triton's onnxruntime backend to prove such a swap loses no request (docs/triton.md).
        raise UserError(f"{repo}: built with --router-backend onnxruntime (the tokenize -> router -> decide ensemble), "
                        "which `zooter triton reload` does not swap: build a repository from the new bundle "
                        "(`zooter triton build`) and restart the server; the running router keeps serving")
    if not (repo / MARKER).is_file():
        raise UserError(f"{repo}: not a repository built by `zooter triton build`")
    current = _latest(repo / ROUTE)
    if current is None or not (current / "router.json").is_file():
        raise UserError(f"{repo}: zooter_route runs on the onnxruntime-backend ensemble; `zooter triton reload` "
                        "swaps --router-backend python repositories only (rebuild with `zooter triton build`)")
    try:
        bundle, new = read_bundle(bundle)
    except BundleError as err:
        raise UserError(f"--bundle: {err}") from None
    old = Manifest.read(current, verify=False)
    problem = swap_problem(old, new)
    if problem is None and new.labels != old.labels:
        problem = (f"another label set ({list(old.labels)} -> {list(new.labels)}); the repository is built for its "
                   "candidates: rebuild it with `zooter triton build --candidates`")
    if problem:
        raise UserError(f"--bundle {bundle}: {problem}; router {old.router_id} keeps serving")
    reloaded = Reloaded(old.router_id, new.router_id, int(current.name) + 1)
    try:
        for name in (ROUTE, ANSWER):
            latest = _latest(repo / name)
            if latest is not None and (latest / "router.json").is_file():
                reloaded.staged[name] = _stage_version(latest, bundle, new)
    except BaseException:
        for folder in reloaded.staged.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return reloaded


def _latest(model: Path) -> Path | None:
    have = versions(model) if model.is_dir() else []
    return model / str(have[-1]) if have else None


def _stage_version(current: Path, bundle: Path, manifest: Manifest) -> Path:
    """The bundle as the version after `current` of its model, beside it first, then renamed in."""
    target = current.parent / str(int(current.name) + 1)
    tmp = Path(tempfile.mkdtemp(prefix=".reload-", dir=current.parent))   # not a number: Triton ignores it
    try:
        # model.py and routing.json (the repository's cost knobs and candidate map) stay those of the running version.
        for name in ("model.py", "routing.json"):
            shutil.copy2(current / name, tmp / name)
        for name, source in _bundle_files(bundle, manifest).items():
            shutil.copy2(source, tmp / name)
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def reload_router(repo: str | Path, bundle: str | Path, url: str, key: str | None) -> Reloaded:
    """Stage the bundle, then have the server at `url` load each model that runs the Router. When Triton
    refuses a load, every new version folder goes again and the models already loaded are loaded back, so
    the running router keeps serving everywhere (Triton keeps what it had when a load fails)."""
    from zooter.serving.triton_client import TritonRequestError, load_model

    reloaded = stage(repo, bundle)
    loaded = []
    for model, target in reloaded.staged.items():
        try:
            load_model(url, model, key)
        except TritonRequestError as err:      # Triton answered that the load failed: it keeps what it had
            for folder in reloaded.staged.values():
                shutil.rmtree(folder, ignore_errors=True)
            back = _load_back(url, loaded, key)
            raise UserError(f"Triton did not load router {reloaded.new} into {model}: {err}; router {reloaded.old} "
                            f"keeps serving{back}") from None
        except (UserError, OSError) as err:    # no answer: the load may still happen, so the version stays on disk
            raise UserError(f"no answer from Triton to the load of router {reloaded.new} into {model} ({err}); it may "
                            f"still load {target}: run the reload again, or remove the new version folders "
                            f"({', '.join(str(f) for f in reloaded.staged.values())}) to keep router {reloaded.old}") from None
        loaded.append(model)
    marker = Path(repo) / MARKER
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "bundle": str(Path(bundle).resolve())}) + "\n")
    return reloaded


def _load_back(url: str, models: list[str], key: str | None) -> str:
    """Load `models` again after their new version folder went, so they serve the old one; '' when all did,
    else what the caller's message should add."""
    from zooter.serving.triton_client import TritonRequestError, load_model

    failed = []
    for model in models:
        try:
            load_model(url, model, key)
        except (TritonRequestError, UserError, OSError) as err:
            failed.append(f"{model}: {err}")
    return f" (but loading the old version back failed: {'; '.join(failed)})" if failed else ""
