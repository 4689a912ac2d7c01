"""Runtime side: the embeddable Router (numpy, onnxruntime, tokenizers; never torch or transformers),
the serving half of the CLI, latency benchmarks, the Triton client and launcher.

`from zooter.runtime import Router, Decision` loads the router module on first use only, so importing
this package stays free of onnxruntime until a router is needed.
"""

_LAZY = {"Router": "zooter.runtime.router", "Decision": "zooter.runtime.router", "BundleError": "zooter.runtime.router"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zooter.runtime' has no attribute {name!r}")
