"""Float64 NumPy reference for the preference objectives, written from the papers' equations.

Independent of ``asft_jax.objectives.losses``: each loss and its gradient w.r.t. the chosen and rejected
log-prob sums is spelled out by hand. l = sum / count is the mean log-prob, r(l) = l - log(1 - e^l)
its log-odds. The guard of the design notes is part of the definition: log(1 - e^l) is evaluated
at min(l, -1e-6) and its derivative -1 / expm1(-l) at the same point. The DPO family works on summed
log-probs; IPO with ``normalize="mean"`` (TRL's form) divides every log-prob, policy and reference, by
its response's token count first.
"""

from __future__ import annotations

import numpy as np

GUARD = -1e-6


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def log1mexp(l):
    return np.log(-np.expm1(np.minimum(l, GUARD)))


def dlog1mexp(l):
    with np.errstate(over="ignore"):  # expm1(1e4) = inf: the derivative is -0 there
        return -1.0 / np.expm1(-np.minimum(l, GUARD))


def log_odds(l):
    return l - log1mexp(l)


def dlog_odds(l):
    return 1.0 - dlog1mexp(l)


def reference(name, sw, nw, sl, nl, rsw=None, rsl=None, **hp):
    """Returns (loss [pairs], dloss/dsw [pairs], dloss/dsl [pairs], metrics) in float64."""
    sw, nw, sl, nl = (np.asarray(x, np.float64) for x in (sw, nw, sl, nl))
    lw, ll = sw / nw, sl / nl
    metrics = {"logps/chosen": lw, "logps/rejected": ll, "nll_loss": -lw}
    if name == "asft":
        lam, beta = hp.get("lam", 1.0), hp.get("beta", 1.0)
        rw, rl = log_odds(lw), log_odds(ll)
        align = -log_sigmoid(beta * rw) - log_sigmoid(-beta * rl)
        loss = -lw + lam * align
        dlw = -1.0 - lam * beta * sigmoid(-beta * rw) * dlog_odds(lw)
        dll = lam * beta * sigmoid(beta * rl) * dlog_odds(ll)
        metrics.update(
            rewards(beta, lw, ll), align_loss=align, log_odds_chosen=rw - rl, log_odds_ratio=log_sigmoid(rw - rl)
        )
    elif name == "sft":
        loss, dlw, dll = -lw, -np.ones_like(lw), np.zeros_like(ll)
        metrics.update(rewards(1.0, lw, ll))
    elif name == "orpo":
        lam = hp.get("lam", 0.1)
        ratio = log_odds(lw) - log_odds(ll)
        loss = -lw - lam * log_sigmoid(ratio)
        dlw = -1.0 - lam * sigmoid(-ratio) * dlog_odds(lw)
        dll = lam * sigmoid(-ratio) * dlog_odds(ll)
        metrics.update(rewards(lam, lw, ll), log_odds_chosen=ratio, log_odds_ratio=log_sigmoid(ratio))
    elif name == "simpo":
        beta, gamma = hp.get("beta", 2.0), hp.get("gamma", 1.0)
        z = beta * (lw - ll) - gamma
        loss, dlw, dll = -log_sigmoid(z), -beta * sigmoid(-z), beta * sigmoid(-z)
        metrics.update(rewards(beta, lw, ll))
    else:  # DPO family: delta = (log pi_w - log pi_w^ref) - (log pi_l - log pi_l^ref)
        beta = hp.get("beta", 0.1)
        rsw, rsl = np.asarray(rsw, np.float64), np.asarray(rsl, np.float64)
        # IPO's "mean" (TRL's DPOTrainer, loss_type="ipo"): each log-prob, policy and reference, is
        # divided by the response's token count n, so d(delta)/d(s_w) = 1 / n_w; "sum": 1.
        per_token = name == "ipo" and hp.get("normalize", "sum") == "mean"
        uw, ul = (nw, nl) if per_token else (1.0, 1.0)
        pw, pl = sw / uw, sl / ul
        cw, cl = pw - rsw / uw, pl - rsl / ul
        delta = cw - cl
        if name == "dpo":  # DPO paper, Eq. 7
            loss, dloss = -log_sigmoid(beta * delta), -beta * sigmoid(-beta * delta)
        elif name == "ipo":  # IPO paper's sampled loss (h - 1/(2 tau))^2, tau = beta
            loss, dloss = (delta - 1 / (2 * beta)) ** 2, 2 * (delta - 1 / (2 * beta))
        elif name == "hinge":
            loss, dloss = np.maximum(0.0, 1 - beta * delta), np.where(1 - beta * delta > 0, -beta, 0.0)
        else:
            raise KeyError(name)
        metrics = {
            "logps/chosen": pw,
            "logps/rejected": pl,
            "logps/chosen_mean": lw,
            "logps/rejected_mean": ll,
            "nll_loss": -lw,
            "rewards/chosen": beta * cw,
            "rewards/rejected": beta * cl,
            "rewards/margins": beta * delta,
            "rewards/accuracies": (cw > cl).astype(np.float64),
        }
        return loss, dloss / uw, -dloss / ul, {k: v.mean() for k, v in metrics.items()} | {"loss": loss.mean()}
    return loss, dlw / nw, dll / nl, {k: v.mean() for k, v in metrics.items()} | {"loss": loss.mean()}


def rewards(beta, lw, ll):
    return {
        "rewards/chosen": beta * lw,
        "rewards/rejected": beta * ll,
        "rewards/margins": beta * (lw - ll),
        "rewards/accuracies": (lw > ll).astype(np.float64),
    }
