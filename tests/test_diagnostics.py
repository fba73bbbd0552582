"""Representation diagnostics against hand-computed values and independent numpy versions."""

import jax
import numpy as np
import pytest

from ssl_jax.evaluation import diagnostics


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _orthonormal_rows(k, dim, seed):
  """k orthonormal vectors in R^dim, not aligned with the axes."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, k)))
  return q.T


def test_alignment_of_identical_pairs_is_zero():
  z = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
  # A rescaled copy is the same point once normalised.
  assert float(diagnostics.alignment(z, 3.0 * z)) == pytest.approx(0.0, abs=1e-6)


def test_alignment_hand_computed():
  z1 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  z2 = np.array([[0.0, 1.0], [0.0, -2.0]], np.float32)  # normalises to (0, 1), (0, -1)
  # Squared distances: |(1, -1)|^2 = 2 and |(0, 2)|^2 = 4.
  assert float(diagnostics.alignment(z1, z2)) == pytest.approx(3.0, rel=1e-6)
  assert float(diagnostics.alignment(z1, z2, alpha=1.0)) == pytest.approx(
      (np.sqrt(2.0) + 2.0) / 2, rel=1e-6)


def test_alignment_has_finite_gradient_at_identical_pairs():
  z = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
  grad = jax.grad(lambda a: diagnostics.alignment(a, z))(z)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('t', [2.0, 0.5])
def test_uniformity_matches_double_loop(t):
  z = _normalize(np.random.default_rng(2).normal(size=(9, 3)))
  terms = [np.exp(-t * np.sum((z[i] - z[j]) ** 2))
           for i in range(len(z)) for j in range(i + 1, len(z))]
  expected = np.log(np.mean(terms))
  assert float(diagnostics.uniformity(z.astype(np.float32), t=t)) == pytest.approx(
      expected, abs=1e-5)


def test_uniformity_of_collapsed_set_is_zero_and_spread_set_is_negative():
  point = np.random.default_rng(3).normal(size=(1, 8)).astype(np.float32)
  collapsed = np.tile(point, (50, 1)) * np.arange(1, 51, dtype=np.float32)[:, None]
  assert float(diagnostics.uniformity(collapsed)) == pytest.approx(0.0, abs=1e-5)
  spread = np.random.default_rng(4).normal(size=(500, 64)).astype(np.float32)
  # Uniform on the sphere of R^D: |a - b|^2 = 2 - 2 cos with cos of mean 0, variance 1/D,
  # so log E exp(-2 |a - b|^2) = -4 + log E exp(4 cos) ~ -4 + 8 / D.
  assert float(diagnostics.uniformity(spread)) == pytest.approx(-4.0 + 8.0 / 64, abs=0.03)


@pytest.mark.parametrize('k', [1, 3, 8])
def test_effective_rank_of_k_equal_energy_directions(k):
  basis = _orthonormal_rows(k, 32, seed=k)
  # 5 copies of each direction with either sign: k equal singular values, the rest 0.
  z = np.concatenate([basis, -basis] * 5).astype(np.float32)
  assert float(diagnostics.effective_rank(z)) == pytest.approx(k, rel=1e-3)


def test_effective_rank_of_unequal_energies_is_below_k():
  k = 4
  basis = _orthonormal_rows(k, 32, seed=5) * np.array([1.0, 2.0, 4.0, 8.0])[:, None]
  rank = float(diagnostics.effective_rank(np.concatenate([basis, -basis]).astype(np.float32)))
  assert 1.5 < rank < k - 0.5


def test_effective_rank_of_repeated_vector_is_one():
  z = np.tile(np.random.default_rng(6).normal(size=(1, 32)), (100, 1)).astype(np.float32)
  assert float(diagnostics.effective_rank(z)) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_matches_numpy_rankme():
  rng = np.random.default_rng(7)
  # A decaying spectrum, so that the rank is neither 1 nor D.
  z = rng.normal(size=(200, 24)) * np.exp(-np.arange(24) / 4.0)
  sigma = np.linalg.svd(z, compute_uv=False)
  p = sigma / np.sum(np.abs(sigma)) + 1e-7
  expected = np.exp(-np.sum(p * np.log(p)))
  assert 2.0 < expected < 20.0
  assert float(diagnostics.effective_rank(z.astype(np.float32))) == pytest.approx(
      expected, rel=1e-4)
  np.testing.assert_allclose(diagnostics.singular_values(z.astype(np.float32)), sigma,
                             rtol=1e-4)


def test_covariance_eigenvalues_sum_to_trace_and_descend():
  rng = np.random.default_rng(8)
  z = rng.normal(size=(300, 16)) + 2.0 * rng.normal(size=(1, 16))  # off-centre
  eigenvalues = np.asarray(diagnostics.covariance_eigenvalues(z.astype(np.float32)))
  u = _normalize(z)
  covariance = np.cov(u, rowvar=False, bias=True)
  assert eigenvalues.shape == (16,)
  assert np.all(np.diff(eigenvalues) <= 0)
  assert eigenvalues.sum() == pytest.approx(np.trace(covariance), rel=1e-4)
  np.testing.assert_allclose(eigenvalues, np.linalg.eigvalsh(covariance)[::-1], atol=1e-5)


def test_representation_diagnostics_values():
  rng = np.random.default_rng(9)
  z1 = rng.normal(size=(256, 32)).astype(np.float32)
  z2 = (z1 + 0.3 * rng.normal(size=z1.shape)).astype(np.float32)
  d = diagnostics.representation_diagnostics(z1, z2)
  scalars = ('alignment', 'uniformity', 'effective_rank', 'effective_rank_fraction',
             'normalized_std', 'std_fraction')
  assert set(d) == set(scalars) | {'spectrum'}
  assert all(isinstance(d[k], float) for k in scalars)
  assert d['spectrum'].shape == (32,)
  assert d['alignment'] == pytest.approx(float(diagnostics.alignment(z1, z2)), rel=1e-5)
  assert d['uniformity'] == pytest.approx(float(diagnostics.uniformity(z1)), rel=1e-5)
  assert d['effective_rank_fraction'] == pytest.approx(d['effective_rank'] / 32, rel=1e-6)
  assert d['std_fraction'] == pytest.approx(d['normalized_std'] * np.sqrt(32), rel=1e-6)
  # Isotropic Gaussian embeddings: a healthy spread and nearly full rank.
  assert d['std_fraction'] == pytest.approx(1.0, abs=0.05)
  assert d['effective_rank_fraction'] > 0.9


def test_collapse_warnings_fire_for_collapsed_embeddings():
  rng = np.random.default_rng(10)
  collapsed = np.tile(rng.normal(size=(1, 32)), (1000, 1)).astype(np.float32)
  d = diagnostics.representation_diagnostics(collapsed, collapsed)
  messages = diagnostics.collapse_warnings(d, min_rank_fraction=0.2, min_std_fraction=0.2)
  assert len(messages) == 2
  assert 'effective_rank_fraction' in messages[0] and '0.2' in messages[0]
  assert 'std_fraction' in messages[1]


def test_collapse_warnings_silent_for_gaussian_embeddings():
  rng = np.random.default_rng(11)
  z = rng.normal(size=(1000, 32)).astype(np.float32)
  d = diagnostics.representation_diagnostics(z, z + 0.1 * rng.normal(size=z.shape))
  assert diagnostics.collapse_warnings(d, min_rank_fraction=0.2, min_std_fraction=0.2) == []


def test_collapse_warnings_per_threshold_and_nan():
  only_rank = {'effective_rank': 3.0, 'effective_rank_fraction': 0.1, 'std_fraction': 0.9}
  (message,) = diagnostics.collapse_warnings(only_rank, 0.2, 0.2)
  assert message.startswith('effective_rank_fraction = 0.1 ')
  diverged = {'effective_rank': float('nan'), 'effective_rank_fraction': float('nan'),
              'std_fraction': 0.9}
  assert len(diagnostics.collapse_warnings(diverged, 0.2, 0.2)) == 1
