"""Preference objectives: ASFT (arXiv 2409.10571) and the baselines it is compared with.

Every objective is a pure function of per-sequence log-prob sums and response-token counts
(``SequenceLogps``, arrays of shape ``[pairs]``) returning ``(loss_per_pair, metrics)``, metrics being
batch means under TRL's names. Length-normalised objectives (ASFT, SFT, ORPO, SimPO) use the mean
log-prob ``l = sum / count``; DPO-family objectives (DPO, IPO, hinge) use sums and reference sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
LOG_HALF = -0.6931471805599453  # log(1/2): where log(-expm1) and log1p(-exp) trade accuracy
MAX_MEAN_LOGP = -1e-6  # log1mexp is evaluated at min(l, this): finite at l = 0


class SequenceLogps(NamedTuple):
    """Per-sequence response log-prob ``sum`` and response token ``count``, each ``[pairs]``."""

    sum: Array
    count: Array

    @property
    def mean(self) -> Array:
        return self.sum / self.count


@jax.custom_jvp
def log1mexp(l: Array) -> Array:
    """log(1 - e^l) for l <= 0, evaluated at ``min(l, -1e-6)``.

    log(-expm1(l)) is accurate near 0 and log1p(-exp(l)) far from it (Maechler 2012). Both branches
    are finite on the clamped input, so ``where`` cannot leak a NaN; the derivative is taken at the
    clamped point and applied to the full input (see the jvp below), which keeps ASFT's chosen-term
    gradient exact up to l = 0.
    """
    x = jnp.minimum(l, MAX_MEAN_LOGP)
    return jnp.where(x > LOG_HALF, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


@log1mexp.defjvp
def _log1mexp_jvp(primals, tangents):
    (l,), (dl,) = primals, tangents
    x = jnp.minimum(l, MAX_MEAN_LOGP)
    # d/dl log(1 - e^l) = -e^l / (1 - e^l) = -1 / expm1(-l)
    return log1mexp(l), -dl / jnp.expm1(-x)


def log_odds(l: Array) -> Array:
    """log(p / (1 - p)) for p = e^l."""
    return l - log1mexp(l)


def _likelihood_metrics(beta: float, lw: Array, ll: Array) -> dict[str, Array]:
    return {
        "logps/chosen": lw.mean(),
        "logps/rejected": ll.mean(),
        "rewards/chosen": (beta * lw).mean(),
        "rewards/rejected": (beta * ll).mean(),
        "rewards/margins": (beta * (lw - ll)).mean(),
        "rewards/accuracies": (lw > ll).astype(jnp.float32).mean(),
        "nll_loss": -lw.mean(),
    }


def asft_loss(chosen: SequenceLogps, rejected: SequenceLogps, lam: float = 1.0, beta: float = 1.0):
    """ASFT: ``-l_w + lam * [-log sig(beta r_w) - log sig(-beta r_l)]``, r the log-odds of the mean
    log-prob (paper, eq. for L_ASFT; beta = 1 in the paper, beta as a temperature from arXiv 2502.01237).
    At beta = 1 the alignment term is ``-l_w - log(1 - p_l)``, so dL/dl_w = -(1 + lam) exactly."""
    lw, ll = chosen.mean, rejected.mean
    rw, rl = log_odds(lw), log_odds(ll)
    align = -jax.nn.log_sigmoid(beta * rw) - jax.nn.log_sigmoid(-beta * rl)
    loss = -lw + lam * align
    return loss, {
        **_likelihood_metrics(beta, lw, ll),
        "align_loss": align.mean(),
        "log_odds_chosen": (rw - rl).mean(),
        "log_odds_ratio": jax.nn.log_sigmoid(rw - rl).mean(),
    }


def sft_loss(chosen: SequenceLogps, rejected: SequenceLogps):
    """SFT on the chosen response: ``-l_w`` (response tokens only)."""
    lw, ll = chosen.mean, rejected.mean
    return -lw, _likelihood_metrics(1.0, lw, ll)


def orpo_loss(chosen: SequenceLogps, rejected: SequenceLogps, lam: float = 0.1):
    """ORPO (arXiv 2403.07691): ``-l_w - lam * log sig(r_w - r_l)``. Unlike TRL, whose NLL term
    also counts prompt tokens, the NLL here is over response tokens, as in the paper."""
    lw, ll = chosen.mean, rejected.mean
    ratio = log_odds(lw) - log_odds(ll)
    loss = -lw - lam * jax.nn.log_sigmoid(ratio)
    return loss, {
        **_likelihood_metrics(lam, lw, ll),
        "log_odds_chosen": ratio.mean(),
        "log_odds_ratio": jax.nn.log_sigmoid(ratio).mean(),
    }


def simpo_loss(chosen: SequenceLogps, rejected: SequenceLogps, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (arXiv 2405.14734): ``-log sig(beta (l_w - l_l) - gamma)``, no reference model."""
    lw, ll = chosen.mean, rejected.mean
    return -jax.nn.log_sigmoid(beta * (lw - ll) - gamma), _likelihood_metrics(beta, lw, ll)


def _dpo_family(link: Callable[[Array], Array], beta: float, chosen, rejected, ref_chosen, ref_rejected):
    cw = chosen.sum - ref_chosen.sum
    cl = rejected.sum - ref_rejected.sum
    loss = link(cw - cl)
    return loss, {
        "logps/chosen": chosen.sum.mean(),
        "logps/rejected": rejected.sum.mean(),
        "rewards/chosen": (beta * cw).mean(),
        "rewards/rejected": (beta * cl).mean(),
        "rewards/margins": (beta * (cw - cl)).mean(),
        "rewards/accuracies": (cw > cl).astype(jnp.float32).mean(),
        "nll_loss": -chosen.mean.mean(),
    }


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """DPO (arXiv 2305.18290), sigmoid: ``-log sig(beta * delta)``, delta the difference of
    policy-minus-reference summed log-prob ratios of chosen and rejected."""
    return _dpo_family(lambda d: -jax.nn.log_sigmoid(beta * d), beta, chosen, rejected, ref_chosen, ref_rejected)


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """IPO (arXiv 2310.12036): ``(delta - 1 / (2 beta))^2`` on summed log-prob ratios."""
    return _dpo_family(lambda d: (d - 1 / (2 * beta)) ** 2, beta, chosen, rejected, ref_chosen, ref_rejected)


def hinge_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """Hinge (SLiC, arXiv 2305.10425): ``relu(1 - beta * delta)``."""
    return _dpo_family(lambda d: jax.nn.relu(1 - beta * d), beta, chosen, rejected, ref_chosen, ref_rejected)


LOSSES: dict[str, Callable] = {
    "asft": asft_loss,
    "sft": sft_loss,
    "orpo": orpo_loss,
    "simpo": simpo_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}
NEEDS_REFERENCE = frozenset({"dpo", "ipo", "hinge"})


def preference_loss(
    name: str,
    chosen: SequenceLogps,
    rejected: SequenceLogps,
    *,
    ref_chosen: SequenceLogps | None = None,
    ref_rejected: SequenceLogps | None = None,
    **hparams: float,
) -> tuple[Array, dict[str, Array]]:
    """The objective ``name`` on a batch of pairs: ``(loss_per_pair [pairs], metrics)``.

    ``metrics`` holds batch means with TRL's names, ``loss`` among them. DPO-family objectives need
    ``ref_chosen``/``ref_rejected`` (precomputed with the frozen starting model).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown objective {name!r}: expected one of {', '.join(LOSSES)}")
    fn = LOSSES[name]
    if name in NEEDS_REFERENCE:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"objective {name!r} needs reference log-probs (ref_chosen, ref_rejected); compute them once with the starting model")
        loss, metrics = fn(chosen, rejected, ref_chosen, ref_rejected, **hparams)
    else:
        loss, metrics = fn(chosen, rejected, **hparams)
    return loss, {"loss": loss.mean(), **metrics}
