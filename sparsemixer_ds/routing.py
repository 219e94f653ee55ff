"""SparseMixer routing: the gradient estimator in pure PyTorch (no DeepSpeed import).

Shape legend: S tokens, E experts, K routes per token (top_k).

Why an estimator at all. With router probabilities p = softmax(z) and a sampled expert D, a
Switch-style layer outputs p_D f_D(x). The gradient of the expected loss J = E_D[L(p_D f_D)] is

    dJ/dz = sum_i p_i dL(p_i f_i)/dz          (gating term: flows through p_D, Switch keeps it)
          + sum_i [L(p_i f_i) - L(0)] dp_i/dz  (routing term: needs every expert, Switch drops it)

SparseMixer (Liu, Gao, Chen 2023, arXiv:2310.00811) writes L(h) - L(0) as the path integral
int_0^1 L'(t h) h dt and estimates it from the one expert that ran:

- midpoint: the integral at its midpoint, L'(h/2) h. Half of the non-argmax draws run the expert
  at half scale (c = 1/2) and the router gradient is doubled (s = 2); averaged over the coin this
  gives the gating term plus the midpoint routing term (SparseMixer, Sec. 4).
- heun3 (SparseMixer-v2, GRIN: Liu et al. 2024, arXiv:2409.12136): Heun's third-order rule,
  L(h) - L(0) ~ h [1/4 L'(h) + 3/4 L'(h/3)]: a quarter of the non-argmax draws run at full scale
  and three quarters at 1/3 scale (c = 1/3), with the plain derivative of p_D (s = 1).

The argmax draw always runs at full scale (c = 1), which keeps the forward pass of the likely
expert exact (ReinMax, Liu et al. 2023, arXiv:2304.08612, motivates the same trade).

Ablations, for studies rather than training (benchmarks/fidelity.py, benchmarks/convergence.py):
- sampled: D ~ p, weight p_D, the plain gradient of p_D (c = 1, s = 1): sampling without any
  routing-term estimate.
- euler: SparseMixer's first-order rule, L(h) - L(0) ~ L'(h) h: full-scale forward, router
  gradient doubled (c = 1, s = 2).
- midpoint-all: midpoint with the coin for the argmax draw too. Exactly unbiased when L is
  quadratic (the midpoint rule is exact there), at the cost of perturbing the likely expert.
"""
from typing import NamedTuple, Tuple

import torch
from torch.autograd.function import once_differentiable

__all__ = ["sparsemixer", "route", "EstimatorRule", "ESTIMATORS", "ROUTING_IMPLS"]

# How the estimator runs: eager PyTorch ops (the reference), fused (compiled), or auto (fused where faster).
ROUTING_IMPLS = ("auto", "eager", "fused")


class EstimatorRule(NamedTuple):
    """How one estimator scales the forward value and the backward signal of p_D."""
    c_low: float  # forward scale of a draw that loses the coin
    q: float  # probability that a draw keeps full scale (c = 1)
    s: float  # factor on the router gradient d p_D / dz
    exempt_argmax: bool = True  # the argmax draw always keeps c = 1


ESTIMATORS = {
    "midpoint": EstimatorRule(c_low=0.5, q=0.5, s=2.0),
    "heun3": EstimatorRule(c_low=1.0 / 3.0, q=0.25, s=1.0),
    # Ablations (see the module docstring).
    "sampled": EstimatorRule(c_low=1.0, q=1.0, s=1.0),
    "euler": EstimatorRule(c_low=1.0, q=1.0, s=2.0),
    "midpoint-all": EstimatorRule(c_low=0.5, q=0.5, s=2.0, exempt_argmax=False),
}


def _check_args(logits: torch.Tensor, top_k: int, jitter_eps: float, estimator: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        seen = (f"shape {tuple(logits.shape)}, dtype {logits.dtype}"
                if isinstance(logits, torch.Tensor) else type(logits).__name__)
        raise ValueError(f"logits must be a 2-D floating-point tensor [tokens, experts]; got {seen}")
    num_experts = logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in 1..{num_experts} (the number of experts); got {top_k!r}")
    if not isinstance(jitter_eps, (int, float)) or not 0.0 <= float(jitter_eps) < float("inf"):
        raise ValueError(f"jitter_eps must be a finite number >= 0 (the paper uses 0.1); got {jitter_eps!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}; got {estimator!r}")


def sparsemixer(logits: torch.Tensor,
                top_k: int = 1,
                jitter_eps: float = 0.1,
                training: bool = True,
                estimator: str = "midpoint") -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick top_k experts per token and return their SparseMixer weights.

    Args:
        logits: router logits, [S, E], any float dtype; never modified.
        top_k: experts per token, sampled without replacement (1..E).
        jitter_eps: experts that multiplicative jitter U(1 - eps, 1 + eps) could never make the
            winner are masked before the softmax: (m - z_i) / max(|z_i|, m) > 2 eps, m the max.
        training: sample D ~ p (inverse CDF, one uniform draw per token and round) and apply the
            estimator's forward scale; else D = argmax and c = 1.
        estimator: "midpoint" (SparseMixer) or "heun3" (SparseMixer-v2 / GRIN); "sampled",
            "euler" and "midpoint-all" are ablations (see the module docstring).

    Returns:
        experts_SK: int64 [S, K], the chosen experts, round by round.
        weights_SK: float32 [S, K], forward value c * p_D of each round's masked softmax; its
            gradient to the logits is s * g * p_D * (onehot(D) - p), whatever c was.
    """
    _check_args(logits, top_k, jitter_eps, estimator)
    return route(logits, top_k, float(jitter_eps), training, ESTIMATORS[estimator])


def route(logits: torch.Tensor, top_k: int, jitter_eps: float, training: bool,
          rule: EstimatorRule) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sparsemixer`` without its argument checks, for callers that checked their options once
    (SparseMixerGate, in its constructor) and call this on every forward."""
    # Router maths in float32: an out-of-place copy unless already fp32, so the input is never touched.
    return _Rounds.apply(logits.float(), top_k, jitter_eps, training, rule)


class _Rounds(torch.autograd.Function):
    """All top_k rounds in one autograd node, with the estimator's backward written out.

    Autograd through the rounds would record a dozen S x E kernels per round (masked fill, softmax,
    gather and their backwards); the backward needs only each round's probabilities p_k, its draw D_k
    and p_{D_k}:  dL/dz = sum_k s * g_k * p_{D_k} * (onehot(D_k) - p_k).  The softmax is written out
    too, reusing the max the jitter mask already needs: PyTorch's CPU softmax is slow on rows as short
    as E = 8 (benchmarks/gate.py; docs/RESULTS.md).
    """

    @staticmethod
    def forward(ctx, scores_SE: torch.Tensor, top_k: int, jitter_eps: float, training: bool,
                rule: EstimatorRule) -> Tuple[torch.Tensor, torch.Tensor]:
        num_tokens = scores_SE.shape[0]
        experts, weights, p_chosen, probs = [], [], [], []
        for _ in range(top_k):
            if experts:  # experts picked in earlier rounds leave the race
                scores_SE = scores_SE.scatter(1, experts[-1].unsqueeze(1), float("-inf"))
            max_S1, argmax_S1 = scores_SE.max(dim=1, keepdim=True)
            # (m - z) / max(|z|, m) > 2 eps, written without the division: the denominator is
            # zero only where m = z = 0, which must not be masked; excluded -inf entries compare
            # inf > inf (false) and stay excluded through exp(-inf) = 0.
            jitter_mask_SE = (max_S1 - scores_SE) > (2.0 * jitter_eps) * torch.maximum(scores_SE.abs(), max_S1)
            unnormalized_SE = torch.exp(scores_SE - max_S1).masked_fill_(jitter_mask_SE, 0.0)
            cdf_SE = unnormalized_SE.cumsum(dim=1)  # unnormalized; its last column is the softmax's sum
            total_S1 = cdf_SE[:, -1:]
            probs_SE = unnormalized_SE.div_(total_S1)
            if training:
                # Inverse-CDF sampling: one uniform per token instead of one noise draw per expert.
                # u lies in (0, total], so the first expert whose running sum reaches it has p > 0.
                coins_S2 = torch.rand(num_tokens, 2, device=scores_SE.device)
                chosen_S = (cdf_SE < (1.0 - coins_S2[:, :1]) * total_S1).sum(dim=1)
                keep_full_S = coins_S2[:, 1] < rule.q
                if rule.exempt_argmax:
                    keep_full_S = keep_full_S | (chosen_S == argmax_S1.squeeze(1))
                scale_S = torch.where(keep_full_S, 1.0, rule.c_low)
            else:
                chosen_S = argmax_S1.squeeze(1)
                scale_S = torch.ones(num_tokens, device=scores_SE.device)
            p_chosen_S = probs_SE.gather(1, chosen_S.unsqueeze(1)).squeeze(1)
            experts.append(chosen_S)
            weights.append(scale_S * p_chosen_S)  # forward value c * p_D
            p_chosen.append(p_chosen_S)
            probs.append(probs_SE)
        experts_SK = torch.stack(experts, dim=1)
        ctx.save_for_backward(experts_SK, torch.stack(p_chosen, dim=1), *probs)
        ctx.s = rule.s
        ctx.mark_non_differentiable(experts_SK)
        return experts_SK, torch.stack(weights, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_experts, grad_weights_SK: torch.Tensor):
        experts_SK, p_chosen_SK, *probs = ctx.saved_tensors
        # Gradient s * d p_D / dz = s * p_D * (onehot(D) - p), whatever the forward scale c was.
        coef_SK = ctx.s * grad_weights_SK * p_chosen_SK
        grad_SE = probs[0] * coef_SK[:, :1]
        for k in range(1, len(probs)):
            grad_SE.addcmul_(probs[k], coef_SK[:, k:k + 1])
        grad_SE = grad_SE.neg_().scatter_add_(1, experts_SK, coef_SK)
        return grad_SE, None, None, None, None
