"""Preference objectives: ASFT (arXiv 2409.10571) and the baselines it is compared with.

Every objective is a pure function of per-sequence log-prob sums and response-token counts
(``SequenceLogps``, arrays of shape ``[pairs]``) returning ``(loss_per_pair, metrics)``, metrics being
batch means under TRL's names. Length-normalised objectives (ASFT, SFT, ORPO, SimPO) use the mean
log-prob ``l = sum / count``; DPO-family objectives (DPO, IPO, hinge) use sums and reference sums
(IPO optionally per-token means, ``normalize="mean"``, as TRL does). ``HPARAMS`` names each
objective's hyperparameter keywords, read from the signatures below.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

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
    """ASFT (arXiv 2409.10571): ``-l_w + lam * [-log sig(beta r_w) - log sig(-beta r_l)]``, r the
    log-odds of the mean log-prob, the paper's L_ASFT = L_NLL + lam * L_Align (beta = 1 there; beta as a
    temperature is from arXiv 2502.01237, where beta = 1 recovers ASFT). At beta = 1 the alignment term
    is ``-l_w - log(1 - p_l)``, so dL/dl_w = -(1 + lam) exactly."""
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
    """ORPO (arXiv 2403.07691, Eqs. 6-7): ``L_SFT + lam * L_OR = -l_w - lam * log sig(r_w - r_l)``,
    r the log-odds of the mean log-prob. Unlike TRL, whose NLL term also counts prompt tokens, the NLL
    here is over response tokens, as in the paper. TRL's ``beta`` is this ``lam``."""
    lw, ll = chosen.mean, rejected.mean
    ratio = log_odds(lw) - log_odds(ll)
    loss = -lw - lam * jax.nn.log_sigmoid(ratio)
    return loss, {
        **_likelihood_metrics(lam, lw, ll),
        "log_odds_chosen": ratio.mean(),
        "log_odds_ratio": jax.nn.log_sigmoid(ratio).mean(),
    }


def simpo_loss(chosen: SequenceLogps, rejected: SequenceLogps, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (arXiv 2405.14734, Eq. 6): ``-log sig(beta (l_w - l_l) - gamma)``, no reference model.
    ``gamma`` is the margin itself; the SimPO code's ``gamma_beta_ratio`` is ``gamma / beta``."""
    lw, ll = chosen.mean, rejected.mean
    return -jax.nn.log_sigmoid(beta * (lw - ll) - gamma), _likelihood_metrics(beta, lw, ll)


IPO_NORMALIZE = ("sum", "mean")


def _dpo_family(
    link: Callable[[Array], Array], beta: float, chosen, rejected, ref_chosen, ref_rejected, normalize: str = "sum"
):
    """Log-ratios ``c = log pi - log pi_ref`` of chosen and rejected, and ``link(c_w - c_l)``.

    ``normalize="sum"``: summed log-probs. ``"mean"``: policy and reference sums both divided by the
    policy's response-token counts (the reference scored the same tokens, so its own ``count`` is not
    read). ``logps/*`` and ``rewards/*`` report whichever log-probs and log-ratios the loss used;
    ``logps/*_mean`` are always per-token means, the unit the reference-free objectives report.
    """
    cw, cl = chosen.sum - ref_chosen.sum, rejected.sum - ref_rejected.sum
    pw, pl = chosen.sum, rejected.sum
    if normalize == "mean":  # (s - s_ref) / n, not s / n - s_ref / n: no float32 cancellation of means
        cw, cl = cw / chosen.count, cl / rejected.count
        pw, pl = chosen.mean, rejected.mean
    loss = link(cw - cl)
    return loss, {
        "logps/chosen": pw.mean(),
        "logps/rejected": pl.mean(),
        "rewards/chosen": (beta * cw).mean(),
        "rewards/rejected": (beta * cl).mean(),
        "rewards/margins": (beta * (cw - cl)).mean(),
        "rewards/accuracies": (cw > cl).astype(jnp.float32).mean(),
        "nll_loss": -chosen.mean.mean(),
        "logps/chosen_mean": chosen.mean.mean(),
        "logps/rejected_mean": rejected.mean.mean(),
    }


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """DPO (arXiv 2305.18290, Eq. 7), sigmoid: ``-log sig(beta * delta)``, delta the difference of
    policy-minus-reference summed log-prob ratios of chosen and rejected. ``rewards/*`` are
    ``beta * (s - s_ref)``."""
    return _dpo_family(lambda d: -jax.nn.log_sigmoid(beta * d), beta, chosen, rejected, ref_chosen, ref_rejected)


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1, normalize: str = "sum"):
    """IPO (arXiv 2310.12036): the sampled IPO loss ``(h - 1 / (2 tau))^2`` with
    ``h = log[pi(y_w) pi_ref(y_l) / (pi(y_l) pi_ref(y_w))]`` and tau = ``beta``.

    ``normalize="sum"`` (default): h from summed log-probs, the paper's sequence log-likelihoods, as
    DPO here. ``normalize="mean"``: TRL's ``DPOTrainer(loss_type="ipo")`` form, every log-prob (policy
    and reference) divided by its response's token count, ``h = (l_w - l_w^ref) - (l_l - l_l^ref)``;
    the reference sums are divided by the policy's counts. ``logps/*`` are then means and
    ``rewards/*`` ``beta * (l - l_ref)``; with ``"sum"``, sums and ``beta * (s - s_ref)``.
    """
    if normalize not in IPO_NORMALIZE:
        raise ValueError(f"ipo: normalize {normalize!r} is not one of {', '.join(IPO_NORMALIZE)}")
    return _dpo_family(lambda d: (d - 1 / (2 * beta)) ** 2, beta, chosen, rejected, ref_chosen, ref_rejected, normalize)


def hinge_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """Hinge: ``relu(1 - beta * delta)`` on summed log-prob ratios, i.e. SLiC-HF's rank-calibration
    hinge ``max(0, margin - (log pi(y_w) - log pi(y_l)))`` (arXiv 2305.10425) with margin ``1 / beta``,
    scaled by ``beta``, on reference-normalised log-probs (RSO's "hinge-norm", arXiv 2309.06657; TRL's
    ``loss_type="hinge"``). ``rewards/*`` are ``beta * (s - s_ref)``."""
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


# Each objective's hyperparameter keywords (the loss parameters with defaults; log-probs have none),
# read from the signatures so that they cannot drift: {"asft": ("lam", "beta"), "sft": (), ...}.
HPARAMS: dict[str, tuple[str, ...]] = {
    name: tuple(p.name for p in inspect.signature(fn).parameters.values() if p.default is not inspect.Parameter.empty)
    for name, fn in LOSSES.items()
}


def preference_loss(
    name: str,
    chosen: SequenceLogps,
    rejected: SequenceLogps,
    *,
    ref_chosen: SequenceLogps | None = None,
    ref_rejected: SequenceLogps | None = None,
    **hparams: Any,
) -> tuple[Array, dict[str, Array]]:
    """The objective ``name`` on a batch of pairs: ``(loss_per_pair [pairs], metrics)``.

    ``metrics`` holds batch means with TRL's names, ``loss`` among them. DPO-family objectives need
    ``ref_chosen``/``ref_rejected`` (precomputed with the frozen starting model). ``hparams`` must be
    among ``HPARAMS[name]``; anything else is a ValueError naming the accepted ones.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown objective {name!r}: expected one of {', '.join(LOSSES)}")
    fn = LOSSES[name]
    unknown = sorted(set(hparams) - set(HPARAMS[name]))
    if unknown:
        accepted = ", ".join(HPARAMS[name]) or "none"
        raise ValueError(
            f"objective {name!r} takes no hyperparameter {', '.join(map(repr, unknown))}: it takes {accepted}"
        )
    if name in NEEDS_REFERENCE:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(
                f"objective {name!r} needs reference log-probs (ref_chosen, ref_rejected); compute them once with "
                "the starting model"
            )
        loss, metrics = fn(chosen, rejected, ref_chosen, ref_rejected, **hparams)
    else:
        loss, metrics = fn(chosen, rejected, **hparams)
    return loss, {"loss": loss.mean(), **metrics}


@dataclasses.dataclass
class ObjectiveConfig:
    """The ``objective`` section: which loss of ``LOSSES``, and the hyperparameters set for it."""

    name: str = "asft"
    lam: float | None = None  # each None: the objective's default
    beta: float | None = None
    gamma: float | None = None
    normalize: str | None = None  # ipo only: sum (default) | mean (TRL's length-normalised log-ratios)

    def hparams(self) -> dict[str, float | str]:
        """The hyperparameters set, as keyword arguments of the objective's loss function."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) is not None
        }


def foreign_hparam(name: str, hparams: dict) -> str | None:
    """The first key of ``hparams`` that objective ``name`` does not take, or None if all fit."""
    return min(set(hparams) - set(HPARAMS[name]), default=None)
