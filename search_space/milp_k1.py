"""K=1: every head of a layer takes the layer's one candidate, so the exact model has one choice per layer.

:func:`per_layer_problem` turns a head-level problem into the equivalent layer-level one (losses and additive
costs summed over the layer's heads, a group-max row charged each group's widest member, objective weights
rescaled so that the layer-level objective equals the head-level one); :meth:`LayerProblem.lift` maps a layer
assignment back to the heads. :mod:`search_space.milp` solves the layer-level problem with its direct model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from search_space.cost_rows import CostRow, loss_scales


@dataclass
class LayerProblem:
    """The layer-level problem: ``loss[N]`` and rows over [layers, C], weights for the layer-level objective."""

    loss: dict
    rows: list[CostRow]
    weights: dict  # layer-level objective weights
    head_weights: Mapping  # the head-level weights they reproduce (every length at 1 when none were given)
    layer_index: np.ndarray  # [H] each head's layer position

    def lift(self, layer_assignment: np.ndarray) -> np.ndarray:
        """[H] candidate per head from [layers] candidate per layer."""
        return layer_assignment[self.layer_index]


def groups_within_layers(group: np.ndarray, layer_of_head: np.ndarray) -> bool:
    """Does every group lie inside one layer? (Else a group-max row is not linear in the per-layer choices.)"""
    return all(len(np.unique(layer_of_head[group == g])) == 1 for g in np.unique(group))


def per_layer_problem(
    loss: Mapping[int, np.ndarray],
    rows: Sequence[CostRow],
    layer_of_head: np.ndarray,
    objective_weights: Mapping | None,
) -> LayerProblem:
    """The layer-level problem equivalent to the head-level one under K=1 (groups must lie within layers)."""
    layers, inv = np.unique(layer_of_head, return_inverse=True)
    nL = len(layers)
    agg = np.zeros((nL, len(inv)))
    agg[inv, np.arange(len(inv))] = 1.0
    loss_l = {n: agg @ l for n, l in loss.items()}
    rows_l = []
    for r in rows:
        if r.group is None:
            rows_l.append(CostRow(key=r.key, cost=agg @ r.cost, upper=r.upper, lower=r.lower, length=r.length,
                                  display_scale=r.display_scale, unit=r.unit))
        else:  # identical choices within a group: the group pays max over members of the candidate's cost
            c = np.zeros((nL, r.cost.shape[1]))
            for g in np.unique(r.group):
                m = r.group == g
                c[inv[np.flatnonzero(m)[0]]] += r.cost[m].max(0)
            rows_l.append(CostRow(key=r.key, cost=c, upper=r.upper, lower=0.0, length=r.length,
                                  display_scale=r.display_scale, unit=r.unit))
    # the layer-level weights must reproduce the head-level objective: scales from the head-level losses
    scales = loss_scales(loss)
    scales_l = loss_scales(loss_l)
    w = objective_weights or {n: 1.0 for n in loss}
    w_l = {n: float(w.get(n, 0.0)) * scales_l[n] / scales[n] for n in loss}
    return LayerProblem(loss=loss_l, rows=rows_l, weights=w_l, head_weights=w, layer_index=inv)
