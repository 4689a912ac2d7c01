"""The tests' one way to run a real tritonserver, and the fake Triton models they serve (tests/fake_models/).

Every fixture that needs a server wraps `tritonserver(repo, ...)`: started with a timeout generous enough for
a machine whose cores are busy elsewhere, stopped through TritonServer.close() however the test ends (a slow
stop under load is waited for, then killed; never an error). The fake models are plain model folders, each
`<name>/config.pbtxt` and `<name>/1/model.py`; `fake_repository` copies the ones a test needs into a model
repository of its own.
"""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FAKE_MODELS = Path(__file__).resolve().parent / "fake_models"


@contextmanager
def tritonserver(repo: str | Path, timeout: float = 300, **options) -> Iterator:
    """A started TritonServer on `repo` (options as TritonServer takes them: extra_repositories, model_control,
    log_file, ...), closed on the way out."""
    from zooter.servers.tritonserver import TritonServer

    server = TritonServer(repo, **options)
    server.start(timeout=timeout)
    try:
        yield server
    finally:
        server.close()


def fake_repository(folder: str | Path, *names: str, **renamed: str) -> Path:
    """`folder` as a model repository holding the fake models `names` (copied from tests/fake_models; links
    followed), and each `renamed` model (new name=fake model) under its new name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for target, source in [*((n, n) for n in names), *renamed.items()]:
        shutil.copytree(FAKE_MODELS / source, folder / target)
    return folder


def onnxruntime_standin(repo: str | Path) -> None:
    """Run a built repository's zooter_router, made for Triton's onnxruntime backend (absent from the Triton here),
    on the python backend: fake_models/onnxruntime_standin runs the same ONNX file with onnxruntime, under the same
    config otherwise (inputs, outputs, batching, version policy)."""
    folder = Path(repo) / "zooter_router"
    config = folder / "config.pbtxt"
    text = config.read_text()
    named = re.search(r'default_model_filename: "([^"]+)"\n', text)
    assert 'platform: "onnxruntime_onnx"' in text and named, text
    text = text.replace('platform: "onnxruntime_onnx"', 'backend: "python"').replace(named.group(0), "")
    config.write_text(text + f'parameters {{ key: "onnx_file" value: {{ string_value: "{named.group(1)}" }} }}\n')
    for version in folder.iterdir():
        if version.name.isdigit():
            shutil.copy(FAKE_MODELS / "onnxruntime_standin" / "model.py", version / "model.py")
