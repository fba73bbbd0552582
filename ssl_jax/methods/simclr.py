"""SimCLR (Chen et al. 2020): an encoder and a projection MLP trained with NT-Xent between
two augmented views of each image, with negatives from the whole global batch.

`method.negatives` chooses the estimator of the negative term: 'uniform' (NT-Xent, the
default when the field is absent), 'debiased' (Chuang et al. 2020, with `method.tau_plus`)
or 'hard' (Robinson et al. 2021, with `method.tau_plus` and `method.beta`), see
`losses/negatives.py`; or 'decoupled' (Yeh et al. 2022: the positive out of the denominator,
with `method.dcl_weighting` 'none' for DCL or 'vmf' for DCLW and its `method.dcl_sigma`),
see `losses/decoupled.py`.
"""

from __future__ import annotations

import dataclasses


from ssl_jax.losses.decoupled import WEIGHTINGS, decoupled_nt_xent
from ssl_jax.losses.info_nce import nt_xent
from ssl_jax.losses.negatives import debiased_nt_xent
from ssl_jax.methods.base import Method
from ssl_jax.methods.common import (EncoderWithProjector, encoder_with_projector,
                                    forward_together)

NEGATIVES = ('uniform', 'debiased', 'hard', 'decoupled')


@dataclasses.dataclass(frozen=True)
class SimCLR(Method):

  @classmethod
  def method_problems(cls, config) -> list[str]:
    m = config.method
    negatives = m.get('negatives', 'uniform')
    if negatives not in NEGATIVES:
      return [f'method.negatives={negatives!r} is unknown; use one of {NEGATIVES}.']
    if negatives == 'decoupled':
      return cls._decoupled_problems(m)
    problems = []
    if m.get('dcl_weighting', 'none') != 'none':
      # The weighting belongs to the decoupled loss: elsewhere it would be silently ignored.
      problems.append(f'method.dcl_weighting={m.dcl_weighting!r} weights the positive term of '
                      "the decoupled loss only: set method.negatives='decoupled' to use it, or "
                      "method.dcl_weighting='none'.")
    if negatives != 'uniform' and not 0 <= m.get('tau_plus', -1.0) < 1:
      problems.append(f'method.negatives={negatives!r} needs method.tau_plus in [0, 1), the '
                      'probability that a negative shares the query\'s class (0.1 in the '
                      f'papers); got {m.get("tau_plus")}.')
    if negatives == 'hard' and not m.get('beta', -1.0) >= 0:
      problems.append("method.negatives='hard' needs method.beta >= 0, the concentration on "
                      'hard negatives (2 x temperature, as Robinson et al. 2021\'s 1.0 at '
                      f'temperature 0.5); got {m.get("beta")}.')
    # The debiased loss has no reweighting: a beta set there would be silently ignored.
    if negatives == 'debiased' and m.get('beta', 0.0) != 0:
      problems.append(f"method.negatives='debiased' does not reweight negatives, so "
                      f"method.beta={m.beta} would be ignored: set method.negatives='hard' "
                      'to use it, or method.beta=0.')
    return problems

  @staticmethod
  def _decoupled_problems(m) -> list[str]:
    problems = []
    weighting = m.get('dcl_weighting', 'none')
    if weighting not in WEIGHTINGS:
      problems.append(f"method.negatives='decoupled' needs method.dcl_weighting in "
                      f"{WEIGHTINGS} ('none': DCL, 'vmf': DCLW); got {weighting!r}.")
    elif weighting == 'vmf' and not m.get('dcl_sigma', 0.0) > 0:
      problems.append("method.dcl_weighting='vmf' needs method.dcl_sigma > 0, the temperature "
                      f'of the von Mises-Fisher weights (0.5 in the paper); got '
                      f'{m.get("dcl_sigma")}.')
    # The debiased and hard estimators' fields do nothing here: say so rather than ignore.
    for field in ('tau_plus', 'beta'):
      if m.get(field, 0.0) != 0:
        problems.append(f"method.negatives='decoupled' has no {field}, so method.{field}="
                        f"{m[field]} would be ignored: set method.negatives='debiased' or "
                        f"'hard' to use it, or method.{field}=0.")
    return problems

  def network(self, axis_name: str | None = None) -> EncoderWithProjector:
    return encoder_with_projector(self.config, axis_name)

  def forward(self, params, batch_stats, views, rng, axis_name, first_row):
    # Both views go through the network as one batch, so BatchNorm normalises them with the
    # same statistics (as the reference implementation does).
    (_, z), batch_stats = forward_together(self.network(axis_name), params, batch_stats,
                                           views, rng, first_row)
    return {'z': z}, batch_stats

  def objective(self, params, method_state, outputs, targets, target_stats, rng, step,
                axis_name):
    del params, targets, target_stats, rng, step  # deterministic given the projections
    z1, z2 = outputs['z']
    loss, metrics = self.contrastive_loss(z1, z2, axis_name)
    return loss, (metrics, method_state)

  def contrastive_loss(self, z1, z2, axis_name):
    m = self.config.method
    negatives = m.get('negatives', 'uniform')
    if negatives == 'uniform':
      return nt_xent(z1, z2, m.temperature, axis_name)
    if negatives == 'decoupled':
      weighting = m.get('dcl_weighting', 'none')
      return decoupled_nt_xent(z1, z2, m.temperature, weighting,
                               m.get('dcl_sigma', 0.5), axis_name)
    # 'debiased' is the hard-negative estimator without reweighting (beta = 0).
    beta = m.beta if negatives == 'hard' else 0.0
    return debiased_nt_xent(z1, z2, m.temperature, m.tau_plus, beta, axis_name)
