"""Swap the router of a running Triton server without dropping requests (`zooter triton reload`).

The new bundle becomes the next version folder of every model that runs the Router (written beside it,
then renamed in, so Triton never sees half a version), and the repository API loads each again.

- A python-backend repository (the CPU build): `zooter_route`, and `zooter`, which routes in its own stub in
  repositories built since it does (a version folder with router.json). Zooter_route loads first: Triton
  loads the new version, sends new requests to it (the default version policy serves the latest), lets
  requests in flight finish on the old one, then unloads it. An older repository's `zooter` asks
  zooter_route, so it routes with the new router as soon as zooter_route does.
- An onnxruntime-backend repository (the ensemble tokenize -> router -> decide, the GPU build): each step
  keeps two versions loaded and the ensemble pins all three to one number. The next version of each step
  loads beside the one serving, then the ensemble's config moves its pin and zooter_route loads again:
  requests in flight finish on the steps they were pinned to, new ones run all three new steps, and no
  request mixes the two routers. `zooter` asks zooter_route, so it follows.

Every answer names the router that chose it. The server must run with model control (`zooter serve
--model-control`), and the load needs its control key.

Only a router that fits the running repository swaps in: the same encoder (zooter.runtime.bundle.swap_problem)
and the same labels (the configs' output widths and `zooter`'s candidate map are built for them; another
label set needs `zooter triton build` with its candidates file); for the ensemble also one the onnxruntime
backend can run (no dynamic INT8, as `zooter triton build` says). Anything else is refused in one line before the
repository is touched, and the running router keeps serving.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from zooter.export.triton_repo import MARKER, RepositoryOptions, _bundle_files, ensemble_bundle_files, read_bundle
from zooter.runtime.bundle import MANIFEST, BundleError, Manifest, swap_problem
from zooter.runtime.errors import UserError
from zooter.runtime.files import write_text_atomic

ROUTE = "zooter_route"
ANSWER = "zooter"       # routes in its own stub in CPU repositories built since issue 24 (router.json in its version)
STEPS = ("zooter_tokenize", "zooter_router", "zooter_decide")     # the onnxruntime-backend ensemble's, in load order
PIN = re.compile(r"(\bmodel_version:\s*)(-?\d+)")


@dataclass
class Reloaded:
    old: str            # router ids (zooter.runtime.bundle.Manifest.router_id)
    new: str
    version: int        # zooter_route's version folder now serving, or the version the ensemble pins
    staged: dict = field(default_factory=dict)     # model -> its new version folder, in the order they load
    ensemble: bool = False

    def describe(self) -> str:
        versions = [f"{model} version {folder.name}" for model, folder in self.staged.items()]
        if self.ensemble:
            versions.append(f"{ROUTE} pinned to {self.version}")
        return f"router {self.old} -> {self.new} ({', '.join(versions) or f'{ROUTE} version {self.version}'})"


def versions(model: Path) -> list[int]:
    return sorted(int(p.name) for p in model.iterdir() if p.is_dir() and p.name.isdigit())


def stage(repo: str | Path, bundle: str | Path) -> Reloaded:
    """Check the bundle against the repository's running router; write it as the next version of each model that
    runs it. Returns what changes (`staged`: the new version folders). UserError (one line) when it does not fit."""
    repo = Path(repo)
    if not (repo / MARKER).is_file():
        raise UserError(f"{repo}: not a repository built by `zooter triton build`")
    ensemble = (repo / "zooter_router").is_dir()
    if ensemble:
        current = repo / STEPS[-1] / str(pinned_version(repo))
    else:
        current = _latest(repo / ROUTE)
        if current is None or not (current / MANIFEST).is_file():
            raise UserError(f"{repo}: zooter_route has no version with the router's files; rebuild it with `zooter triton build`")
    try:
        bundle, new = read_bundle(bundle)
    except BundleError as err:
        raise UserError(f"--bundle: {err}") from None
    old = Manifest.read_file(current / MANIFEST)
    problem = swap_problem(old, new)
    if problem is None and new.labels != old.labels:
        problem = (f"another label set ({list(old.labels)} -> {list(new.labels)}); the repository is built for its "
                   "candidates: rebuild it with `zooter triton build --candidates`")
    if problem is None and ensemble:
        problem = _ensemble_problem(bundle, new)
    if problem:
        raise UserError(f"--bundle {bundle}: {problem}; router {old.router_id} keeps serving")
    reloaded = Reloaded(old.router_id, new.router_id, int(current.name) + 1, ensemble=ensemble)
    if ensemble:
        left = [str(repo / step / str(reloaded.version)) for step in STEPS if (repo / step / str(reloaded.version)).exists()]
        if left:        # a reload Triton did not answer; Triton may have loaded them, so they are not rewritten here
            raise UserError(f"{', '.join(left)}: left by an earlier reload that Triton did not answer (zooter_route still "
                            f"pins version {current.name}); remove them and run the reload again; router "
                            f"{old.router_id} keeps serving")
    try:
        if ensemble:
            for name, files in ensemble_bundle_files(bundle, new).items():
                if name == "zooter_router":
                    files = _as_configured(repo, files, new)
                reloaded.staged[name] = _stage_version(repo / name / current.name, old, files)
        else:
            for name in (ROUTE, ANSWER):
                latest = _latest(repo / name)
                if latest is not None and (latest / MANIFEST).is_file():
                    reloaded.staged[name] = _stage_version(latest, old, _bundle_files(bundle, new))
    except BaseException:
        for folder in reloaded.staged.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return reloaded


def pinned_version(repo: Path) -> int:
    """The version the ensemble's three steps are pinned to; UserError for a repository built before they were."""
    pins = {int(n) for _, n in PIN.findall((repo / ROUTE / "config.pbtxt").read_text())}
    if len(pins) != 1 or min(pins) < 1:
        raise UserError(f"{repo}: its zooter_route ensemble does not pin its steps to one version (built before "
                        "`zooter triton reload` swapped ensembles): rebuild it with `zooter triton build`; the running "
                        "router keeps serving")
    version = pins.pop()
    missing = [step for step in STEPS if not (repo / step / str(version)).is_dir()]
    if missing:
        raise UserError(f"{repo}: zooter_route pins version {version}, which {', '.join(missing)} lacks; rebuild it "
                        "with `zooter triton build`")
    return version


def _ensemble_problem(bundle: Path, new: Manifest) -> str | None:
    """Why the ensemble's onnxruntime backend cannot run `new`, or None."""
    try:
        RepositoryOptions(router_backend="onnxruntime").check(bundle, new)
    except UserError as err:
        return str(err).removeprefix(f"{bundle}: ")
    return None


def _as_configured(repo: Path, files: dict[str, Path], new: Manifest) -> dict[str, Path]:
    """zooter_router's new files, its ONNX file under the name its config gives the backend (an fp16 bundle's
    model.fp16.onnx may replace a model.onnx: external data files keep their names, which the graph refers to)."""
    named = re.search(r'default_model_filename:\s*"([^"]+)"', (repo / "zooter_router" / "config.pbtxt").read_text())
    if named is None or named.group(1) == new.model_file:
        return files
    return {(named.group(1) if name == new.model_file else name): path for name, path in files.items()}


def _latest(model: Path) -> Path | None:
    have = versions(model) if model.is_dir() else []
    return model / str(have[-1]) if have else None


def _stage_version(current: Path, old: Manifest, files: dict[str, Path]) -> Path:
    """The version after `current` of its model, beside it first, then renamed in: what is not the old router's
    (model.py, routing.json: the repository's cost knobs and candidate map) as it is, and the new router's `files`."""
    target = current.parent / str(int(current.name) + 1)
    tmp = Path(tempfile.mkdtemp(prefix=".reload-", dir=current.parent))   # not a number: Triton ignores it
    routers = {MANIFEST, *old.files}
    try:
        for path in current.iterdir():
            if path.is_file() and path.name not in routers:
                shutil.copy2(path, tmp / path.name)
        for name, source in files.items():
            shutil.copy2(source, tmp / name)
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def reload_router(repo: str | Path, bundle: str | Path, url: str, key: str | None) -> Reloaded:
    """Stage the bundle, then have the server at `url` load each model that runs the Router (and, for the
    ensemble, zooter_route with its steps pinned to the new version). When Triton refuses a load, every new
    version folder goes again, the ensemble's pin goes back, and the models already loaded are loaded back, so
    the running router keeps serving everywhere (Triton keeps what it had when a load fails)."""
    from zooter.serving.triton_client import TritonRequestError, load_model

    repo = Path(repo)
    reloaded = stage(repo, bundle)
    config = repo / ROUTE / "config.pbtxt"
    pinned = config.read_text() if reloaded.ensemble else None
    order = list(reloaded.staged) + (["pin"] if reloaded.ensemble else [])
    loaded = []
    for step in order:
        model = ROUTE if step == "pin" else step
        try:
            if step == "pin":
                write_text_atomic(PIN.sub(lambda m: f"{m.group(1)}{reloaded.version}", pinned), config)
            load_model(url, model, key)
        except TritonRequestError as err:      # Triton answered that the load failed: it keeps what it had
            for folder in reloaded.staged.values():
                shutil.rmtree(folder, ignore_errors=True)
            if pinned is not None:
                write_text_atomic(pinned, config)
            back = _load_back(url, loaded, key)
            raise UserError(f"Triton did not load router {reloaded.new} into {model}: {err}; router {reloaded.old} "
                            f"keeps serving{back}") from None
        except (UserError, OSError) as err:    # no answer: the load may still happen, so the version stays on disk
            folders = ", ".join(str(f) for f in reloaded.staged.values())
            if reloaded.ensemble:
                unpin = f", pin {config} back to version {reloaded.version - 1}" if step == "pin" else ""
                todo = f"remove the new version folders ({folders}){unpin} and run the reload again"
            else:
                todo = f"run the reload again, or remove the new version folders ({folders}) to keep router {reloaded.old}"
            raise UserError(f"no answer from Triton to the load of router {reloaded.new} into {model} ({err}); it may "
                            f"still load it: {todo}") from None
        loaded.append(model)
    marker = repo / MARKER
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
