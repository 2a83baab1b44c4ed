"""The vocabulary of routing, shared by the router, the engine and the CLI: where a prompt goes and why."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.multitask import MultiTaskModel
from models.stacked import GLOBAL

GLOBAL_NAME = "_global"  # the global Theta in routes; task names start with a letter or digit, so never clash
MODES = ("select", "blend", "fallback")
SCORERS = ("classifier", "bayes")


class RouterError(Exception):
    """No usable router, or a routing request that cannot be served (user-facing)."""


@dataclass
class Route:
    """Where one prompt goes: adapter weights that sum to 1, and why."""

    task: str  # the top task, or GLOBAL_NAME on fallback
    weights: dict[str, float]  # adapter name -> weight, mixed in output space
    fallback: bool = False
    reason: str = "select"  # select | blend | override | unsure | ood | empty
    scores: dict[str, float] = field(default_factory=dict)  # p(task | x) over the routable tasks
    ood: float | None = None  # distance to the nearest task centroid (higher = less like any task)

    def to_json(self) -> dict:
        return {"task": self.task, "weights": self.weights, "fallback": self.fallback, "reason": self.reason,
                "scores": self.scores, "ood_score": self.ood}


def global_id(name: str, mtm: MultiTaskModel) -> int:
    """Routing id of an adapter name (a task, or GLOBAL_NAME for Theta)."""
    if name == GLOBAL_NAME:
        return GLOBAL
    if name not in mtm.task_names:
        raise RouterError(f"unknown task {name!r} (tasks: {', '.join(mtm.task_names)})")
    return mtm.task_id(name)
