"""Mixed precision under a budget: choose one measured option per layer by an exact
multiple-choice knapsack (dynamic programming over layer bytes, rounded up to a small unit
so a plan never exceeds its budget), and the Pareto front of size vs predicted metric.

Predicted damage of a plan = the sum of its layers' measured single-layer damages (a
first-order model, checked by ``verify`` against the real quantized model). Measured damages
are noisy on small evaluation sets, so each layer's damages are first made plausible (see
``effective_damages``): never negative (unless measured at an operating point, where a
negative marginal change is real), and never smaller for a smaller option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SpecError
from ..recipe import Recipe, Rule
from .sensitivity import candidate_scheme

MAX_UNITS = 200_000  # DP cells per layer: fine enough to trade w4-g64 for w4-g128 on one layer


def effective_damages(options: dict[str, Any], floor: float = 0.0) -> dict[str, float]:
    """Per candidate of one layer: the measured damage raised to at least ``floor`` and to at least
    the damage of every option that stores more bytes. A single-layer measurement below zero, or a
    2-bit option measured better than 4-bit, is evaluation noise; a knapsack fed raw values
    would buy that noise with the smallest formats. (Tables measured at an operating point hold
    marginal changes, where below zero is real: their floor is -inf.)"""
    ranked = sorted(options, key=lambda c: -int(options[c]["bytes"]))
    out = {}
    for cand in ranked:
        floor = max(floor, float(options[cand]["damage"]))
        out[cand] = floor
    return out


def damage_floor(table: dict[str, Any]) -> float:
    """0 for damages measured around the float model, -inf for marginal ones at an operating point."""
    return -math.inf if table.get("base") else 0.0


@dataclass
class Plan:
    """One choice per layer with its predicted size (layer bytes) and damage."""

    choices: dict[str, str]
    layer_bytes: int
    damage: float

    def to_dict(self) -> dict[str, Any]:
        return {"choices": self.choices, "layer_bytes": self.layer_bytes, "predicted_damage": self.damage}


def _cost(option: dict[str, Any], cost: str) -> int:
    """An option's cost as an integer: bytes, or estimated latency in nanoseconds."""
    if cost == "bytes":
        return int(option["bytes"])
    if cost == "latency":
        if "latency_ms" not in option:
            raise SpecError("the sensitivity table has no latency estimates; measure it again")
        return max(1, round(1e6 * float(option["latency_ms"])))
    raise SpecError(f"knapsack cost {cost!r} is unknown; use bytes or latency")


class Knapsack:
    """min total damage for every total cost (bytes, or estimated latency; in units), with
    back-pointers per layer."""

    def __init__(self, table: dict[str, Any], allowed: list[str] | None = None, cost: str = "bytes") -> None:
        self.layers = list(table["layers"])
        if not self.layers:
            raise SpecError("the sensitivity table has no layers")
        self.table = table
        self.options = []
        self.base = 0  # total cost of the cheapest option of every layer
        for name in self.layers:
            opts = table["layers"][name]["options"]
            names = [c for c in (allowed or list(opts)) if c in opts]
            if not names:
                raise SpecError(f"{name}: none of the allowed candidates {allowed} was measured")
            damage = effective_damages(opts, damage_floor(table))
            costs = {c: _cost(opts[c], cost) for c in names}
            least = min(costs.values())
            # the DP runs over the cost above each layer's cheapest option: a finer unit for the same range
            self.base += least
            self.options.append([(c, costs[c] - least, damage[c]) for c in names])
        total = sum(max(b for _, b, _ in opts) for opts in self.options)
        self.unit = max(1, math.ceil(total / MAX_UNITS))
        self.size = total // self.unit + len(self.layers) + 1
        dp = np.full(self.size, np.inf)
        dp[0] = 0.0
        self.back = np.zeros((len(self.layers), self.size), dtype=np.int16)
        for li, opts in enumerate(self.options):
            new = np.full(self.size, np.inf)
            for oi, (_, nbytes, damage) in enumerate(opts):
                units = math.ceil(nbytes / self.unit)
                shifted = np.full(self.size, np.inf)
                shifted[units:] = dp[: self.size - units] + damage
                better = shifted < new
                new[better] = shifted[better]
                self.back[li][better] = oi
            dp = new
        self.dp = dp
        self.best = np.minimum.accumulate(dp)  # least damage within each size

    def plan_within(self, cost: int) -> Plan:
        """The least-damage plan whose total cost (bytes, or latency in ns) is at most ``cost``."""
        if cost < self.base:
            raise SpecError("no plan fits this budget: even the smallest option of every layer is larger")
        return self.plan_at((cost - self.base) // self.unit)

    def plan_at(self, units: int) -> Plan:
        """The least-damage plan using at most ``units`` units above the cheapest plan."""
        units = min(units, self.size - 1)
        if not np.isfinite(self.best[units]):
            raise SpecError("no plan fits this budget: even the smallest option of every layer is larger")
        b = int(np.flatnonzero(self.dp[: units + 1] == self.best[units])[0])
        choices = {}
        for li in reversed(range(len(self.layers))):
            name, size, _ = self.options[li][self.back[li][b]]
            choices[self.layers[li]] = name
            b -= math.ceil(size / self.unit)
        damage = sum(o[2] for li, n in enumerate(self.layers) for o in self.options[li] if o[0] == choices[n])
        layers = self.table["layers"]
        nbytes = sum(int(layers[n]["options"][c]["bytes"]) for n, c in choices.items())
        return Plan(dict(reversed(list(choices.items()))), nbytes, damage)

    def smallest_within(self, max_damage: float) -> Plan:
        """The smallest plan whose predicted damage is at most ``max_damage``."""
        ok = np.flatnonzero(self.best <= max_damage)
        if not ok.size:
            raise SpecError(
                f"no plan keeps the predicted damage under {max_damage}; the least is {float(self.best[-1]):.4g}"
            )
        return self.plan_at(int(ok[0]))

    def front(self, points: int = 40) -> list[Plan]:
        """Pareto-optimal plans (size vs damage), up to ``points`` of them, smallest first."""
        finite = np.flatnonzero(np.isfinite(self.best))
        steps = finite[np.r_[True, np.diff(self.best[finite]) < 0]]
        pick = steps[np.unique(np.linspace(0, len(steps) - 1, min(points, len(steps))).astype(int))]
        return [self.plan_at(int(u)) for u in pick]


def allocate(
    table: dict[str, Any],
    *,
    layer_budget_bytes: int | None = None,
    avg_bits: float | None = None,
    max_damage: float | None = None,
    allowed: list[str] | None = None,
) -> Plan:
    """Exactly one budget: bytes for the quantized layers, average bits per weight over them,
    or the largest acceptable predicted damage (then the smallest plan is chosen)."""
    given = [v is not None for v in (layer_budget_bytes, avg_bits, max_damage)]
    if sum(given) != 1:
        raise SpecError("give exactly one budget: --budget-mb, --avg-bits or --max-drop")
    knap = Knapsack(table, allowed)
    if max_damage is not None:
        return knap.smallest_within(max_damage)
    if avg_bits is not None:
        if avg_bits <= 0:
            raise SpecError(f"--avg-bits {avg_bits} must be positive")
        params = sum(table["layers"][n]["params"] for n in knap.layers)
        layer_budget_bytes = int(avg_bits * params / 8)
    if layer_budget_bytes <= 0:
        raise SpecError("the budget leaves no room for the quantized layers (the float parts alone exceed it)")
    return knap.plan_within(layer_budget_bytes)


def uniform_plans(table: dict[str, Any]) -> list[Plan]:
    """Every candidate applied to every layer: the presets a plan is compared with."""
    plans = []
    for cand in table["candidates"]:
        layers = table["layers"]
        if all(cand in layers[n]["options"] for n in layers):
            plans.append(
                Plan(
                    {n: cand for n in layers},
                    sum(layers[n]["options"][cand]["bytes"] for n in layers),
                    sum(effective_damages(layers[n]["options"], damage_floor(table))[cand] for n in layers),
                )
            )
    return plans


def plan_latency_ms(table: dict[str, Any], plan: Plan) -> float | None:
    """Estimated latency of the planned layers (sum of their timed options), None without timings."""
    options = [table["layers"][n]["options"][c] for n, c in plan.choices.items()]
    if not all("latency_ms" in o for o in options):
        return None
    return sum(float(o["latency_ms"]) for o in options)


def float_latency_ms(table: dict[str, Any]) -> float | None:
    """Estimated latency of the same layers left in float, None without timings."""
    layers = table["layers"].values()
    if not all("float_latency_ms" in e for e in layers):
        return None
    return sum(float(e["float_latency_ms"]) for e in layers)


def plan_recipe(plan: Plan, name: str = "plan", description: str = "") -> Recipe:
    """A recipe naming every layer exactly, usable by ``lowbit quantize --recipe``."""
    rules = tuple(Rule(candidate_scheme(cand), match=layer) for layer, cand in plan.choices.items())
    return Recipe(name=name, rules=rules, description=description or f"mixed precision, {len(rules)} layers")
