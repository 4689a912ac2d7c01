"""routing.json: what a Triton repository's routing models read besides the bundle (`zooter triton build`).

    labels           the bundle's candidate names, in logit order
    costs            the rule's unit price per label (zooter.runtime.decision.unit_price), or null
    candidates       {label: {"model": the Triton model that answers, or null; "why"; optional "io",
                     "decoupled", "stand_in"}}: where the `zooter` model sends a chosen candidate
    decision         {"lambda", "tolerance"}: the repository's cost knobs (the bundle's defaults unless
                     the build said otherwise)
    router_backend   "python" (zooter_route runs the Router) or "onnxruntime" (the ensemble)
    bundle           {"format_version", "max_length", "model_file"} of the bundle it was built from

`RoutingConfig` is its typed form: the builder writes it (`to_json`), and every Triton model that reads
routing.json loads it through `RoutingConfig.read`, which validates it and names the bad key. Standard
library only (plus the rule's checks): the Triton models import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from zooter.runtime.errors import SettingError, UserError

ROUTING = "routing.json"
ROUTER_BACKENDS = ("python", "onnxruntime")


class RoutingConfigError(UserError):
    """routing.json is missing, not JSON, or a key is not what the routing models read."""


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    labels: tuple[str, ...]
    candidates: dict                       # label -> {"model": name or None, "why": str, ...}
    lam: float = 0.0
    tolerance: float = 0.0
    costs: tuple[float, ...] | None = None
    router_backend: str = "python"
    bundle: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"labels": list(self.labels), "costs": None if self.costs is None else list(self.costs),
                "candidates": self.candidates, "decision": {"lambda": self.lam, "tolerance": self.tolerance},
                "router_backend": self.router_backend, "bundle": self.bundle}

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / ROUTING
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path

    @classmethod
    def from_json(cls, obj, where: str = ROUTING) -> "RoutingConfig":
        """A routing.json object, validated: a RoutingConfigError names the first bad key."""
        from zooter.runtime.decision import check_weight

        def bad(message: str):
            raise RoutingConfigError(f"{where}: {message}")

        if not isinstance(obj, dict):
            bad(f"expected a JSON object, got {type(obj).__name__}")
        labels = obj.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
            bad(f"'labels' must be a list of candidate names, got {labels!r:.80}")
        candidates = obj.get("candidates")
        if not isinstance(candidates, dict) or set(candidates) != set(labels):
            bad("'candidates' must be an object with an entry for every label, and only them")
        for label, entry in candidates.items():
            if not isinstance(entry, dict) or not (entry.get("model") is None or isinstance(entry["model"], str)):
                bad(f"'candidates'.{label} must be an object whose 'model' is a model name or null")
        decision = obj.get("decision")
        if not isinstance(decision, dict):
            bad("'decision' must be an object {lambda, tolerance}")
        try:
            lam = check_weight(decision.get("lambda", 0.0), "decision.lambda")
            tolerance = check_weight(decision.get("tolerance", 0.0), "decision.tolerance")
            costs = obj.get("costs")
            if costs is not None:
                if not isinstance(costs, list) or len(costs) != len(labels):
                    bad(f"'costs' must be null or one unit price per label ({len(labels)})")
                costs = tuple(check_weight(c, "costs[]") for c in costs)
        except SettingError as err:
            bad(str(err))
        if (lam or tolerance) and costs is None:
            bad(f"decision.{'lambda' if lam else 'tolerance'} needs 'costs'")
        backend = obj.get("router_backend", "python")
        if backend not in ROUTER_BACKENDS:
            bad(f"'router_backend' must be one of {', '.join(ROUTER_BACKENDS)}, got {backend!r}")
        bundle = obj.get("bundle", {})
        if not isinstance(bundle, dict):
            bad("'bundle' must be an object")
        return cls(labels=tuple(labels), candidates=candidates, lam=lam, tolerance=tolerance, costs=costs,
                   router_backend=backend, bundle=bundle)

    @classmethod
    def read(cls, path: str | Path) -> "RoutingConfig":
        """routing.json (the file, or the model version folder holding it), validated."""
        path = Path(path)
        if path.is_dir():
            path = path / ROUTING
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise RoutingConfigError(f"{path}: missing file (build the repository with `zooter triton build`)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RoutingConfigError(f"{path}: not a JSON file ({err})") from None
        return cls.from_json(obj, str(path))
