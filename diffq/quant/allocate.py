"""Bit allocation across layer types under an average budget (LAQ-style heterogeneous layouts).

Given, per layer type, candidate layouts with their stored bits and a measured error (e.g. the model's eps error
when only that type is quantized with the layout), choose one layout per type minimising the summed error with
the total bits within the budget: a multiple-choice knapsack, solved greedily by the best error decrease per bit
from every type's cheapest layout (Lagrangian-optimal on each type's lower convex hull).
"""
from __future__ import annotations


def greedy_allocation(options: dict[str, list[tuple[str, float, float]]], budget_bits: float) -> dict[str, str]:
  """{type: chosen layout name} from options {type: [(layout, bits, error), ...]}; total bits <= budget_bits.
  Raises if even the cheapest layouts exceed the budget."""
  choice = {t: min(range(len(opts)), key=lambda i: (opts[i][1], opts[i][2])) for t, opts in options.items()}
  used = sum(options[t][i][1] for t, i in choice.items())
  if used > budget_bits:
    raise ValueError(f"The cheapest layouts need {used:.0f} bits, over the budget of {budget_bits:.0f}; raise the "
                     "budget or add cheaper candidate layouts.")
  while True:
    best = None
    for t, opts in options.items():
      _, bits0, err0 = opts[choice[t]]
      for i, (_, bits, err) in enumerate(opts):
        if bits > bits0 and err < err0 and used - bits0 + bits <= budget_bits:
          gain = (err0 - err) / (bits - bits0)
          if best is None or gain > best[0]:
            best = (gain, t, i)
    if best is None:
      return {t: options[t][i][0] for t, i in choice.items()}
    _, t, i = best
    used += options[t][i][1] - options[t][choice[t]][1]
    choice[t] = i
