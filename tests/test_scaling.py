"""Scaling fits recover a known law from noisy synthetic losses; bad input gets one sentence."""

import json

import numpy as np
import pytest

from llm_jax.tools import scaling
from llm_jax.errors import UserError

# Hoffmann et al.'s fitted law, used as the truth the fits must recover.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N_opt ∝ C^a when C = 6ND
TRUE_B = TRUE["alpha"] / (TRUE["alpha"] + TRUE["beta"])
NOISE = 0.005  # multiplicative noise on the loss, 0.5% standard deviation
# Tolerances of the recovered exponents at this noise; a fit with a sign or factor error in
# the parabola vertex, the power law or the Huber gradient misses them by far more.
EXPONENT_TOLERANCE = 0.03
E_TOLERANCE = 0.05


def synthetic_points(seed=0, budgets=5, sizes=7, noise=NOISE) -> scaling.Points:
  """IsoFLOP profiles of the true law: per budget, sizes from N_opt/8 to 8 N_opt, D = C/6N."""
  rng = np.random.default_rng(seed)
  budget, params, tokens = [], [], []
  for c in np.geomspace(1e18, 1e21, budgets):
    n_opt = 0.3 * (c / 6) ** TRUE_A
    for n in n_opt * np.geomspace(1 / 8, 8, sizes):
      budget.append(c)
      params.append(n)
      tokens.append(c / (6 * n))
  params, tokens = np.array(params), np.array(tokens)
  loss = (TRUE["E"] + TRUE["A"] / params**TRUE["alpha"] + TRUE["B"] / tokens**TRUE["beta"]) * (
      np.exp(rng.normal(0.0, noise, len(params))))
  return scaling.Points(np.array(budget), params, tokens, loss,
                        [f"m{i}" for i in range(len(params))])


def test_isoflop_fit_recovers_the_compute_optimal_exponents():
  fit = scaling.isoflop_fit(synthetic_points())
  assert abs(fit["a"] - TRUE_A) < EXPONENT_TOLERANCE
  assert abs(fit["b"] - TRUE_B) < EXPONENT_TOLERANCE
  assert all(profile["inside"] for profile in fit["profiles"].values())
  # D_opt = C / (6 N_opt) holds at every budget, since the synthetic sweep has C = 6ND.
  for budget, profile in fit["profiles"].items():
    assert profile["d_opt"] == pytest.approx(budget / (6 * profile["n_opt"]), rel=1e-6)


def test_parabola_vertex_is_the_minimum_and_concave_profiles_are_rejected():
  params = np.exp(np.linspace(8, 12, 5))
  tokens = 1e9 / params
  loss = 0.2 * (np.log(params) - 10.5) ** 2 + 3.0
  profile = scaling.fit_profile(params, tokens, loss)
  assert profile["n_opt"] == pytest.approx(np.exp(10.5), rel=1e-6)
  assert profile["loss_opt"] == pytest.approx(3.0, abs=1e-9)
  assert scaling.fit_profile(params, tokens, -loss) is None
  assert scaling.fit_profile(params[:2], tokens[:2], loss[:2]) is None
  edge = scaling.fit_profile(params, tokens, 0.2 * (np.log(params) - 13.0) ** 2)
  assert not edge["inside"]


def test_parametric_fit_recovers_the_law():
  fit = scaling.parametric_fit(synthetic_points(seed=1))
  assert abs(fit["alpha"] - TRUE["alpha"]) < EXPONENT_TOLERANCE
  assert abs(fit["beta"] - TRUE["beta"]) < EXPONENT_TOLERANCE
  assert abs(fit["E"] - TRUE["E"]) < E_TOLERANCE
  assert abs(fit["a"] - TRUE_A) < EXPONENT_TOLERANCE


def test_bootstrap_intervals_bracket_the_estimate_and_the_truth():
  points = synthetic_points(seed=2)
  full = scaling.parametric_fit(points)
  intervals = scaling.bootstrap(points, draws=12, seed=0, parametric=full)
  low, high = intervals["approach2"]["a"]
  assert low < TRUE_A < high and high - low < 0.2
  for key in ("alpha", "beta", "E"):
    low, high = intervals["approach3"][key]
    assert low <= full[key] + 1e-3 and full[key] - 1e-3 <= high
    assert abs((low + high) / 2 - TRUE[key]) < E_TOLERANCE


def _write_sweep_jsonl(path, points):
  rows = [{"name": name, "status": "finished", "overrides": {"flops_budget": float(c)},
           "params": float(n), "tokens": float(d), "flops": float(6 * n * d),
           "val_loss": float(loss), "train_loss": float(loss)}
          for name, c, n, d, loss in zip(points.names, points.budget, points.params,
                                         points.tokens, points.loss)]
  rows.append({**rows[0], "name": "unfinished", "status": "interrupted", "val_loss": None})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_fit_command_writes_json_and_plots_and_keeps_them(tmp_path):
  from llm_jax import cli
  points = synthetic_points(budgets=3, sizes=5)
  sweep_dir = tmp_path / "sweep"
  sweep_dir.mkdir()
  _write_sweep_jsonl(sweep_dir / "sweep.jsonl", points)
  out = tmp_path / "fit"
  assert cli.main(["scaling", "fit", str(sweep_dir), "--out", str(out), "--draws", "3"]) == 0
  fits = json.loads((out / "scaling_fit.json").read_text())
  assert fits["members"] == len(points.loss)  # the interrupted row is left out
  for name in ("isoflop.png", "optimal.png", "parametric.png"):
    assert (out / name).read_bytes()[:4] == b"\x89PNG"
  before = (out / "scaling_fit.json").read_text()
  assert cli.main(["scaling", "fit", str(sweep_dir), "--out", str(out), "--draws", "3"]) == 2
  assert (out / "scaling_fit.json").read_text() == before


def test_fit_refuses_sweeps_without_a_minimum(tmp_path):
  points = synthetic_points(budgets=3, sizes=5)
  monotone = points.take(np.flatnonzero(points.params < 0.3 * (points.budget / 6) ** TRUE_A / 2))
  with pytest.raises(UserError, match="no IsoFLOP minimum"):
    scaling.analyse(monotone, draws=2)
  with pytest.raises(UserError, match="does not exist"):
    scaling.load_points(tmp_path / "missing")
