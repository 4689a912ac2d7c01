"""Swap the router of a running Triton server without dropping requests (`zooter triton reload`).

The new bundle becomes the next version folder of `zooter_route` (written beside it, then renamed in, so
Triton never sees half a version), and the repository API loads the model again: Triton loads the new
version, sends new requests to it (the default version policy serves the latest), lets requests in
flight finish on the old one, then unloads it. `zooter` calls zooter_route by name, so its next request
is routed by the new router. The server must run with model control (`zooter serve --model-control`),
and the load needs its control key.

Only a router that fits the running repository swaps in: the same encoder (zooter.runtime.bundle.swap_problem)
and the same labels (the configs' output widths and `zooter`'s candidate map are built for them; another
label set needs `zooter triton build` with its candidates file). Anything else is refused in one line
before the repository is touched, and the running router keeps serving.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zooter.export.triton_repo import MARKER, _onnx_files, read_bundle
from zooter.runtime.bundle import BundleError, Manifest, swap_problem
from zooter.runtime.errors import UserError

ROUTE = "zooter_route"


@dataclass
class Reloaded:
    old: str            # router ids (zooter.runtime.bundle.Manifest.router_id)
    new: str
    version: int        # zooter_route's version folder now serving


def versions(model: Path) -> list[int]:
    return sorted(int(p.name) for p in model.iterdir() if p.is_dir() and p.name.isdigit())


def stage(repo: str | Path, bundle: str | Path) -> tuple[Path, Reloaded]:
    """Check the bundle against the repository's latest router; write it as the next version of zooter_route.
    Returns (the new version folder, what changes). UserError (one line) when it does not fit."""
    repo = Path(repo)
    if (repo / MARKER).is_file() and (repo / "zooter_router").is_dir():
        # The ensemble's three models would have to swap as one, and its answers name no router yet; nothing
        # here can load Triton's onnxruntime backend to prove such a swap loses no request (docs/triton.md).
        raise UserError(f"{repo}: built with --router-backend onnxruntime (the tokenize -> router -> decide ensemble), "
                        "which `zooter triton reload` does not swap: build a repository from the new bundle "
                        "(`zooter triton build`) and restart the server; the running router keeps serving")
    if not (repo / MARKER).is_file():
        raise UserError(f"{repo}: not a repository built by `zooter triton build`")
    model = repo / ROUTE
    have = versions(model) if model.is_dir() else []
    if not have or not (model / str(have[-1]) / "router.json").is_file():
        raise UserError(f"{repo}: zooter_route runs on the onnxruntime-backend ensemble; `zooter triton reload` "
                        "swaps --router-backend python repositories only (rebuild with `zooter triton build`)")
    current = model / str(have[-1])
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
    target = model / str(have[-1] + 1)
    tmp = Path(tempfile.mkdtemp(prefix=".reload-", dir=model))   # not a number: Triton ignores it
    try:
        # model.py and routing.json (the repository's cost knobs and candidate map) stay those of the running version.
        for name in ("model.py", "routing.json"):
            shutil.copy2(current / name, tmp / name)
        for name in ("router.json", *_onnx_files(bundle, new), "tokenizer.json"):
            shutil.copy2(bundle / name, tmp / name)
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, Reloaded(old.router_id, new.router_id, have[-1] + 1)


def reload_router(repo: str | Path, bundle: str | Path, url: str, key: str | None) -> Reloaded:
    """Stage the bundle, then have the server at `url` load it; on a failed load the version folder goes
    again and the running router keeps serving (Triton keeps what it had when a load fails)."""
    from zooter.serving.triton_client import TritonRequestError, load_model

    target, reloaded = stage(repo, bundle)
    try:
        load_model(url, ROUTE, key)
    except TritonRequestError as err:      # Triton answered that the load failed: it keeps what it had
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"Triton did not load router {reloaded.new}: {err}; router {reloaded.old} keeps serving") from None
    except (UserError, OSError) as err:    # no answer: the load may still happen, so the version stays on disk
        raise UserError(f"no answer from Triton to the load of router {reloaded.new} ({err}); it may still load "
                        f"{target}: run the reload again, or remove that folder to keep router {reloaded.old}") from None
    marker = Path(repo) / MARKER
    info = json.loads(marker.read_text())
    marker.write_text(json.dumps({**info, "bundle": str(Path(bundle).resolve())}) + "\n")
    return reloaded
