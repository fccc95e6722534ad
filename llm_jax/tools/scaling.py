"""Scaling-law fits of a sweep's final losses: IsoFLOP profiles and a parametric L(N, D).

Following Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models"):

Approach 2, IsoFLOP profiles. Members that share a compute budget C form one profile. Per
budget, a parabola in ln N is fitted through the final losses,
    L = c2 (ln N)^2 + c1 ln N + c0,    N_opt(C) = exp(-c1 / (2 c2)),
and D_opt(C) is read off the same budget's members by fitting ln D as a line in ln N (exact
for C = 6ND, and it uses the sweep's own FLOPs per token otherwise). Lines through
(ln C, ln N_opt) and (ln C, ln D_opt) give N_opt ∝ C^a and D_opt ∝ C^b.

Approach 3, a parametric loss. L(N, D) = E + A / N^alpha + B / D^beta is fitted to every
member by minimising the Huber loss (delta 1e-3) between
    ln L_hat = logsumexp(a - alpha ln N, b - beta ln D, e)    (A = e^a, B = e^b, E = e^e)
and ln L, with L-BFGS (scipy) started from the best points of a grid of starting values. With
C proportional to N D, the loss-optimal allocation is N_opt ∝ C^(beta / (alpha + beta)) and
D_opt ∝ C^(alpha / (alpha + beta)).

Bootstrap intervals refit resampled data: approach 2 resamples residuals within each budget
(the sizes are a fixed design), approach 3 resamples members; intervals are the 2.5 and 97.5
percentiles of the refits.
"""

import dataclasses
import itertools
import json
import math
import pathlib

import numpy as np
import scipy.optimize
import scipy.special
import threadpoolctl

from llm_jax.errors import UserError

HUBER_DELTA = 1e-3
# Starting values in the spirit of Hoffmann et al.'s grid, thinned: L-BFGS starts from the
# `num_starts` grid points with the lowest objective.
START_GRID = {
    "a": [0.0, 5.0, 10.0, 20.0],
    "b": [0.0, 5.0, 10.0, 20.0],
    "e": [-1.0, 0.0, 1.0, 1.5],
    "alpha": [0.1, 0.3, 0.6, 1.2],
    "beta": [0.1, 0.3, 0.6, 1.2],
}


@dataclasses.dataclass
class Points:
  """Finished members as arrays: budget, parameters, tokens and final loss of each."""
  budget: np.ndarray  # the member's FLOPs budget C (its profile)
  params: np.ndarray  # N
  tokens: np.ndarray  # D
  loss: np.ndarray  # final loss L
  names: list

  def take(self, index) -> "Points":
    return Points(self.budget[index], self.params[index], self.tokens[index], self.loss[index],
                  [self.names[i] for i in index])


def load_points(source, loss_key: str = "val_loss", params_key: str = "params") -> Points:
  """Reads the finished rows of SWEEP_DIR/sweep.jsonl (or a .jsonl path) into Points.

  A member's budget is its `flops_budget` override; a member without one is grouped by its
  training FLOPs rounded to two significant digits.
  """
  path = pathlib.Path(source)
  if path.is_dir():
    path = path / "sweep.jsonl"
  if not path.is_file():
    raise UserError(f"{path} does not exist; pass a sweep directory or its sweep.jsonl.")
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  rows = [r for r in rows if r["status"] == "finished"]
  if not rows:
    raise UserError(f"{path} has no finished members yet; run the sweep first.")
  for key in (loss_key, params_key):
    if key not in rows[0]:
      raise UserError(f"{path} rows have no {key!r}; choose one of "
                      f"{', '.join(k for k, v in rows[0].items() if isinstance(v, float))}.")

  def budget(row):
    if "flops_budget" in row["overrides"]:
      return float(row["overrides"]["flops_budget"])
    return float(f"{row['flops']:.2g}")

  return Points(np.array([budget(r) for r in rows]), np.array([float(r[params_key]) for r in rows]),
                np.array([float(r["tokens"]) for r in rows]),
                np.array([float(r[loss_key]) for r in rows]), [r["name"] for r in rows])


# ---------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles.


def fit_profile(params, tokens, loss) -> dict | None:
  """One budget's parabola in ln N.

  None without a usable minimum: fewer than 3 sizes, a concave fit, or a vertex further
  outside the trained sizes than their own span (in ln N).
  """
  ln_n = np.log(params)
  if len(np.unique(ln_n)) < 3:
    return None
  c2, c1, c0 = np.polyfit(ln_n, loss, 2)
  if c2 <= 0:
    return None
  ln_n_opt = -c1 / (2 * c2)
  width = ln_n.max() - ln_n.min()
  if not ln_n.min() - width <= ln_n_opt <= ln_n.max() + width:
    return None  # a vertex this far outside the sizes trained is no estimate of N_opt
  slope, intercept = np.polyfit(ln_n, np.log(tokens), 1)
  return {"coefficients": [float(c2), float(c1), float(c0)],
          "n_opt": float(math.exp(ln_n_opt)),
          "d_opt": float(math.exp(intercept + slope * ln_n_opt)),
          "loss_opt": float(c0 - c1**2 / (4 * c2)),
          "inside": bool(ln_n.min() <= ln_n_opt <= ln_n.max())}


def _power_law(x, y) -> tuple[float, float]:
  """(exponent, coefficient) of y = coefficient * x^exponent, least squares in log-log."""
  exponent, ln_coefficient = np.polyfit(np.log(x), np.log(y), 1)
  return float(exponent), float(math.exp(ln_coefficient))


def isoflop_fit(points: Points) -> dict | None:
  """Approach 2; None when fewer than two budgets have a parabola with a minimum."""
  profiles = {}
  for budget in np.unique(points.budget):
    mask = points.budget == budget
    profile = fit_profile(points.params[mask], points.tokens[mask], points.loss[mask])
    if profile is not None:
      profiles[float(budget)] = profile
  if len(profiles) < 2:
    return None
  budgets = np.array(list(profiles))
  n_opt = np.array([p["n_opt"] for p in profiles.values()])
  d_opt = np.array([p["d_opt"] for p in profiles.values()])
  a, n_coefficient = _power_law(budgets, n_opt)
  b, d_coefficient = _power_law(budgets, d_opt)
  return {"a": a, "b": b, "n_coefficient": n_coefficient, "d_coefficient": d_coefficient,
          "profiles": profiles,
          "tokens_per_param": {c: p["d_opt"] / p["n_opt"] for c, p in profiles.items()}}


# ---------------------------------------------------------------------------------------------
# Approach 3: parametric loss.

_PARAMETER_ORDER = ("a", "b", "e", "alpha", "beta")


def _huber(residual, delta):
  small = np.abs(residual) <= delta
  return np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)), small


def _objective(theta, ln_n, ln_d, ln_loss, delta):
  """Huber loss of ln L_hat - ln L and its gradient in (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])
  top = terms.max(axis=0)
  ln_pred = top + np.log(np.exp(terms - top).sum(axis=0))  # logsumexp, without its overhead
  residual = ln_pred - ln_loss
  losses, small = _huber(residual, delta)
  value = losses.sum()
  slope = np.where(small, residual, delta * np.sign(residual))
  weights = np.exp(terms - ln_pred)  # d ln_pred / d term
  gradient = np.array([
      (slope * weights[0]).sum(), (slope * weights[1]).sum(), (slope * weights[2]).sum(),
      -(slope * weights[0] * ln_n).sum(), -(slope * weights[1] * ln_d).sum()])
  return value, gradient


def parametric_fit(points: Points, num_starts: int = 16, extra_starts=(),
                   delta: float = HUBER_DELTA) -> dict:
  """Approach 3: E, A, B, alpha, beta minimising the Huber loss on ln L (see module doc)."""
  ln_n, ln_d, ln_loss = np.log(points.params), np.log(points.tokens), np.log(points.loss)
  grid = np.array(list(itertools.product(*(START_GRID[k] for k in _PARAMETER_ORDER))))
  a, b, e, alpha, beta = (grid[:, i, None] for i in range(5))  # every start at once
  ln_pred = scipy.special.logsumexp(
      np.stack([a - alpha * ln_n, b - beta * ln_d, np.broadcast_to(e, (len(grid), len(ln_n)))]),
      axis=0)
  initial = _huber(ln_pred - ln_loss, delta)[0].sum(axis=1)
  starts = list(grid[np.argsort(initial)[:num_starts]]) + [np.asarray(s) for s in extra_starts]
  best = None
  # Tiny problems: BLAS threads only contend with each other (and with training) here.
  with threadpoolctl.threadpool_limits(1):
    for start in starts:
      result = scipy.optimize.minimize(
          _objective, start, args=(ln_n, ln_d, ln_loss, delta), jac=True, method="L-BFGS-B")
      if best is None or result.fun < best.fun:
        best = result
  a, b, e, alpha, beta = (float(v) for v in best.x)
  return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta,
          "a": beta / (alpha + beta), "b": alpha / (alpha + beta), "huber_loss": float(best.fun),
          "theta": [a, b, e, alpha, beta]}


def parametric_loss(fit: dict, params, tokens):
  return fit["E"] + fit["A"] / np.power(params, fit["alpha"]) + fit["B"] / np.power(
      tokens, fit["beta"])


# ---------------------------------------------------------------------------------------------
# Bootstrap and the whole analysis.


def bootstrap(points: Points, draws: int = 200, seed: int = 0, parametric_starts: int = 2,
              parametric: dict | None = None) -> dict:
  """95% percentile intervals of a, b (approach 2) and E, alpha, beta, a, b (approach 3).

  Approach 2 keeps the design (the sizes trained at each budget) and resamples each budget's
  residuals from its parabola, scaled by sqrt(n / (n - 3)) to undo the shrinkage of a
  3-parameter fit; draws in which fewer than two budgets keep a minimum are dropped and
  counted. Approach 3 resamples whole members with replacement.
  """
  rng = np.random.default_rng(seed)
  groups = [np.flatnonzero(points.budget == c) for c in np.unique(points.budget)]
  fitted, residuals = points.loss.copy(), np.zeros_like(points.loss)
  for group in groups:
    if len(np.unique(points.params[group])) > 3:
      ln_n = np.log(points.params[group])
      fitted[group] = np.polyval(np.polyfit(ln_n, points.loss[group], 2), ln_n)
      residuals[group] = (points.loss[group] - fitted[group]) * math.sqrt(
          len(group) / (len(group) - 3))
  samples = {"approach2": {"a": [], "b": []},
             "approach3": {"E": [], "alpha": [], "beta": [], "a": [], "b": []}}
  extra = [parametric["theta"]] if parametric else []
  for _ in range(draws):
    loss = fitted.copy()
    for group in groups:
      loss[group] += rng.choice(residuals[group], size=len(group), replace=True)
    fit2 = isoflop_fit(dataclasses.replace(points, loss=loss))
    if fit2 is not None:
      for key in samples["approach2"]:
        samples["approach2"][key].append(fit2[key])
    anywhere = rng.choice(len(points.loss), size=len(points.loss), replace=True)
    fit3 = parametric_fit(points.take(anywhere), parametric_starts, extra)
    for key in samples["approach3"]:
      samples["approach3"][key].append(fit3[key])
  intervals = {}
  for approach, values in samples.items():
    intervals[approach] = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                           for k, v in values.items() if v}
    intervals[approach]["draws"] = len(next(iter(values.values())))
  intervals["requested_draws"] = draws
  return intervals


def analyse(points: Points, draws: int = 200, seed: int = 0) -> dict:
  """Both fits and their bootstrap intervals, as one JSON-ready dict."""
  approach2 = isoflop_fit(points)
  if approach2 is None:
    raise UserError("Fewer than two budgets have three or more sizes whose losses curve "
                    "upward, so no IsoFLOP minimum can be fitted; add sizes on both sides of "
                    "the best one.")
  approach3 = parametric_fit(points)
  return {"members": len(points.loss), "budgets": sorted(float(c) for c in set(points.budget)),
          "approach2": approach2, "approach3": approach3,
          "bootstrap": bootstrap(points, draws, seed, parametric=approach3)}


# ---------------------------------------------------------------------------------------------
# Plots.


def plot(points: Points, fits: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """isoflop.png, optimal.png and parametric.png in out_dir; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  budgets = sorted(set(points.budget))
  colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
  approach2, approach3 = fits["approach2"], fits["approach3"]
  paths = []

  figure, axis = plt.subplots(figsize=(6.4, 4.6))
  for color, budget in zip(colors, budgets):
    mask = points.budget == budget
    axis.scatter(points.params[mask], points.loss[mask], color=color, label=f"C = {budget:.2g}")
    profile = approach2["profiles"].get(float(budget))
    if profile:
      grid = np.geomspace(points.params[mask].min() / 1.3, points.params[mask].max() * 1.3, 100)
      axis.plot(grid, np.polyval(profile["coefficients"], np.log(grid)), color=color)
      axis.scatter([profile["n_opt"]], [profile["loss_opt"]], color=color, marker="*", s=160,
                   edgecolor="black", zorder=3)
  axis.set(xscale="log", xlabel="parameters N", ylabel="final validation loss",
           title="IsoFLOP profiles (stars: fitted N_opt)")
  axis.legend()
  paths.append(_save(figure, out_dir / "isoflop.png"))

  figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  c_opt = np.array(list(approach2["profiles"]))
  line = np.geomspace(c_opt.min() / 2, c_opt.max() * 2, 50)
  for axis, key, exponent, coefficient, label in (
      (axes[0], "n_opt", approach2["a"], approach2["n_coefficient"], "N_opt"),
      (axes[1], "d_opt", approach2["b"], approach2["d_coefficient"], "D_opt")):
    values = [p[key] for p in approach2["profiles"].values()]
    axis.scatter(c_opt, values, color="black", zorder=3, label="per-budget optimum")
    axis.plot(line, coefficient * line**exponent, label=f"{label} ∝ C^{exponent:.2f}")
    axis.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=label)
    axis.legend()
  figure.suptitle("Compute-optimal parameters and tokens (approach 2)")
  paths.append(_save(figure, out_dir / "optimal.png"))

  figure, axis = plt.subplots(figsize=(6.4, 4.8))
  n_grid = np.geomspace(points.params.min() / 3, points.params.max() * 3, 200)
  d_grid = np.geomspace(points.tokens.min() / 3, points.tokens.max() * 3, 200)
  n_mesh, d_mesh = np.meshgrid(n_grid, d_grid)
  contours = axis.contour(n_mesh, d_mesh, parametric_loss(approach3, n_mesh, d_mesh), levels=15,
                          cmap="viridis")
  axis.clabel(contours, fontsize=7)
  for color, budget in zip(colors, budgets):
    mask = points.budget == budget
    axis.scatter(points.params[mask], points.tokens[mask], color=color,
                 label=f"C = {budget:.2g}", edgecolor="black")
  axis.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="training tokens D",
           title=f"L = {approach3['E']:.2f} + {approach3['A']:.3g}/N^{approach3['alpha']:.2f}"
                 f" + {approach3['B']:.3g}/D^{approach3['beta']:.2f}")
  axis.legend(fontsize=8)
  paths.append(_save(figure, out_dir / "parametric.png"))
  return paths


def _save(figure, path: pathlib.Path) -> pathlib.Path:
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  import matplotlib.pyplot as plt
  plt.close(figure)
  return path


def fit_and_plot(source, out_dir, draws: int = 200, seed: int = 0, loss_key: str = "val_loss",
                 params_key: str = "params", overwrite: bool = False) -> dict:
  """Fits `source` (a sweep dir or sweep.jsonl), writes scaling_fit.json and three plots."""
  if draws < 1:
    raise UserError(f"--draws={draws} must be at least 1.")
  out_dir = pathlib.Path(out_dir)
  outputs = [out_dir / name for name in
             ("scaling_fit.json", "isoflop.png", "optimal.png", "parametric.png")]
  existing = [p for p in outputs if p.exists()]
  if existing and not overwrite:
    raise UserError(f"{existing[0]} already exists; pass --overwrite to replace the fit's "
                    "outputs or choose another --out.")
  points = load_points(source, loss_key, params_key)
  fits = analyse(points, draws, seed)
  fits.update(source=str(source), loss_key=loss_key, params_key=params_key, seed=seed)
  out_dir.mkdir(parents=True, exist_ok=True)
  plot(points, fits, out_dir)
  outputs[0].write_text(json.dumps(fits, indent=1) + "\n")
  return fits


# Published compute-optimal exponents, quoted beside ours.
PUBLISHED = {
    "Chinchilla approach 2 (Hoffmann et al. 2022)": {"a": 0.49, "b": 0.51},
    "Chinchilla approach 3 (Hoffmann et al. 2022)": {"a": 0.46, "b": 0.54},
    "Kaplan et al. 2020": {"a": 0.73},
}
CHINCHILLA_TOKENS_PER_PARAM = 20


def summary(fits: dict) -> str:
  """A few lines for people: exponents with intervals, the parametric law, tokens per param."""
  two, three, intervals = fits["approach2"], fits["approach3"], fits["bootstrap"]

  def with_interval(approach, key, value):
    low, high = intervals[approach].get(key, [float("nan")] * 2)
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"

  lines = [
      f"{fits['members']} members, {len(fits['budgets'])} budgets; 95% bootstrap intervals "
      f"from {intervals['approach2']['draws']}/{intervals['requested_draws']} (approach 2) and "
      f"{intervals['approach3']['draws']} (approach 3) resamples",
      f"approach 2 (IsoFLOP): N_opt ∝ C^{with_interval('approach2', 'a', two['a'])}, "
      f"D_opt ∝ C^{with_interval('approach2', 'b', two['b'])}",
      f"approach 3 (parametric): L = {three['E']:.3f} + {three['A']:.4g}/N^{three['alpha']:.3f} "
      f"+ {three['B']:.4g}/D^{three['beta']:.3f}",
      f"  E {with_interval('approach3', 'E', three['E'])}, alpha "
      f"{with_interval('approach3', 'alpha', three['alpha'])}, beta "
      f"{with_interval('approach3', 'beta', three['beta'])}",
      f"  implied a = beta/(alpha+beta) = {with_interval('approach3', 'a', three['a'])}, "
      f"b = {with_interval('approach3', 'b', three['b'])}",
  ]
  for budget, ratio in two["tokens_per_param"].items():
    profile = two["profiles"][budget]
    lines.append(f"C = {float(budget):.3g}: N_opt {profile['n_opt']:,.0f}, D_opt "
                 f"{profile['d_opt']:,.0f}, {ratio:.1f} tokens/parameter"
                 f"{'' if profile['inside'] else ' (minimum outside the sizes trained)'}")
  published = "; ".join(f"{name}: " + ", ".join(f"{k} ≈ {v}" for k, v in values.items())
                        for name, values in PUBLISHED.items())
  lines.append(f"published: {published}; Chinchilla ≈ {CHINCHILLA_TOKENS_PER_PARAM} "
               "tokens/parameter")
  return "\n".join(lines)
