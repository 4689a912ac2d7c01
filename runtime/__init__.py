"""The bottom layer: the embeddable Router (numpy, onnxruntime, tokenizers; never torch or transformers)
and what every consumer of a bundle shares with it: the bundle format (router.json, zooter.runtime.bundle),
the Triton repository's routing.json (zooter.runtime.routing), the tokenizer rules, the decision rule and
the candidate I/O core. The Triton models import this package only; the Triton client and launcher live above.

`from zooter.runtime import Router, Decision` loads the router module on first use only, so importing
this package stays free of onnxruntime until a router is needed.
"""

_LAZY = {"Router": "zooter.runtime.router", "Decision": "zooter.runtime.router", "BundleError": "zooter.runtime.router"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zooter.runtime' has no attribute {name!r}")
