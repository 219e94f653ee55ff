"""SparseMixer routing: the gradient estimator in pure PyTorch (no DeepSpeed import); its rules are the
table sparsemixer_ds.routing.registry.ESTIMATORS.

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

Two implementations of one computation (``impl``): eager, PyTorch ops, the reference; and fused,
the same forward and backward functions compiled by torch.compile (inductor: C++ on a CPU, Triton
on a GPU) into a few kernels instead of a chain of S x E passes. The uniforms are drawn before
either runs, so both take the same draws from the same seed; "auto" picks fused where it is faster
(``use_fused``; benchmarks/gate.py --sizes).
"""
from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .registry import ROUTING_IMPLS, EstimatorRule, RouterOptions, check_top_k

__all__ = ["sparsemixer", "route", "check_impl", "use_fused", "compiler_available"]


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        seen = (f"shape {tuple(logits.shape)}, dtype {logits.dtype}"
                if isinstance(logits, torch.Tensor) else type(logits).__name__)
        raise ValueError(f"logits must be a 2-D floating-point tensor [tokens, experts]; got {seen}")


def sparsemixer(logits: torch.Tensor,
                top_k: int = 1,
                jitter_eps: float = 0.1,
                training: bool = True,
                estimator: str = "midpoint",
                impl: str = "eager") -> Tuple[torch.Tensor, torch.Tensor]:
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
        impl: "eager" (PyTorch ops: the reference), "fused" (the same computation compiled into a
            few kernels: same random draws, forward values and gradient formula) or "auto" (fused
            where it is faster and a compiler is available; see ``use_fused``).

    Returns:
        experts_SK: int64 [S, K], the chosen experts, round by round.
        weights_SK: float32 [S, K], forward value c * p_D of each round's masked softmax; its
            gradient to the logits is s * g * p_D * (onehot(D) - p), whatever c was.
    """
    _check_logits(logits)
    check_top_k(top_k, logits.shape[1])
    options = RouterOptions(estimator=estimator, jitter_eps=jitter_eps, routing_impl=impl).check()
    check_impl(impl, logits.device)
    return route(logits, top_k, float(jitter_eps), training, options.rule, use_fused(impl, logits))


def route(logits: torch.Tensor, top_k: int, jitter_eps: float, training: bool,
          rule: EstimatorRule, fused: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sparsemixer`` without its argument checks, for callers that checked their options once
    (sparsemixer_ds.routing.core, for both MoE paths) and call this on every forward. ``fused``: run the
    compiled kernels (``use_fused`` says when)."""
    # Router maths in float32: an out-of-place copy unless already fp32, so the input is never touched.
    scores_SE = logits.float()
    # The uniforms of every round, drawn here in the order the rounds use them, so that both
    # implementations consume the same random stream: draws are a function of the seed alone.
    coins_KS2 = (torch.rand(top_k, scores_SE.shape[0], 2, device=scores_SE.device) if training else None)
    if fused:
        return _FusedRounds.apply(scores_SE, coins_KS2, top_k, jitter_eps, training, rule)
    return _Rounds.apply(scores_SE, coins_KS2, top_k, jitter_eps, training, rule)


def _masked_softmax(scores_SE: torch.Tensor, jitter_eps: float, sampling: bool = True):
    """One round's jitter-masked softmax, with what sampling needs from it.

    Returns probs_SE, the running sum cdf_SE of the unnormalized probabilities (None unless
    ``sampling``), the softmax's denominator total_S1 and argmax_S1, the first of each row's tied maxima
    (torch.max's documented tie rule, and the references' argmax).
    """
    # .max(dim), not amax: inside a model that torch.compile traces whole, amax made the router's gradient
    # wrong. Where the indices go unused (the backward), the compiled kernel drops them.
    max_S1, argmax_S1 = scores_SE.max(dim=1, keepdim=True)
    # (m - z) / max(|z|, m) > 2 eps, written without the division: the denominator is zero only
    # where m = z = 0, which must not be masked; excluded -inf entries compare inf > inf (false)
    # and stay excluded through exp(-inf) = 0.
    jitter_mask_SE = (max_S1 - scores_SE) > (2.0 * jitter_eps) * torch.maximum(scores_SE.abs(), max_S1)
    unnormalized_SE = torch.exp(scores_SE - max_S1).masked_fill_(jitter_mask_SE, 0.0)
    cdf_SE = None
    if sampling:
        cdf_SE = unnormalized_SE.cumsum(dim=1)  # unnormalized; its last column is the softmax's sum
        total_S1 = cdf_SE[:, -1:]
    else:
        total_S1 = unnormalized_SE.sum(dim=1, keepdim=True)
    return unnormalized_SE.div_(total_S1), cdf_SE, total_S1, argmax_S1


def _rounds_forward(scores_SE: torch.Tensor, coins_KS2: Optional[torch.Tensor], top_k: int, jitter_eps: float,
                    training: bool, c_low: float, q: float, exempt_argmax: bool):
    """All rounds' draws and weights: experts_SK, weights_SK, p_chosen_SK, and each round's probs_SE."""
    experts, weights, p_chosen, probs = [], [], [], []
    for k in range(top_k):
        if experts:  # experts picked in earlier rounds leave the race
            scores_SE = scores_SE.scatter(1, experts[-1].unsqueeze(1), float("-inf"))
        probs_SE, cdf_SE, total_S1, argmax_S1 = _masked_softmax(scores_SE, jitter_eps, sampling=training)
        argmax_S = argmax_S1.squeeze(1)
        if training:
            # Inverse-CDF sampling: one uniform per token instead of one noise draw per expert.
            # u lies in (0, total], so the first expert whose running sum reaches it has p > 0.
            coins_S2 = coins_KS2[k]
            chosen_S = (cdf_SE < (1.0 - coins_S2[:, :1]) * total_S1).sum(dim=1)
            # Only the argmax, the first of tied maxima, is exempt from the coin, as in SparseMixer v1, v2 and
            # HF PhiMoE: another expert tied at the maximum takes the coin like any non-argmax draw.
            keep_full_S = (coins_S2[:, 1] < q) | ((chosen_S == argmax_S) & exempt_argmax)
            scale_S = torch.where(keep_full_S, 1.0, c_low)
        else:
            chosen_S = argmax_S
            scale_S = torch.ones_like(total_S1[:, 0])
        p_chosen_S = probs_SE.gather(1, chosen_S.unsqueeze(1)).squeeze(1)
        experts.append(chosen_S)
        weights.append(scale_S * p_chosen_S)  # forward value c * p_D
        p_chosen.append(p_chosen_S)
        probs.append(probs_SE)
    return torch.stack(experts, dim=1), torch.stack(weights, dim=1), torch.stack(p_chosen, dim=1), probs


def _rounds_backward(probs: List[torch.Tensor], experts_SK: torch.Tensor, p_chosen_SK: torch.Tensor,
                     grad_weights_SK: torch.Tensor, s: float) -> torch.Tensor:
    """Gradient s * d p_D / dz = s * g * p_D * (onehot(D) - p) summed over rounds, whatever c was."""
    coef_SK = s * grad_weights_SK * p_chosen_SK
    grad_SE = probs[0] * coef_SK[:, :1]
    for k in range(1, len(probs)):
        grad_SE.addcmul_(probs[k], coef_SK[:, k:k + 1])
    return grad_SE.neg_().scatter_add_(1, experts_SK, coef_SK)


class _Rounds(torch.autograd.Function):
    """All top_k rounds in one autograd node, with the estimator's backward written out (eager).

    Autograd through the rounds would record a dozen S x E kernels per round (masked fill, softmax,
    gather and their backwards); the backward needs only each round's probabilities p_k, its draw D_k
    and p_{D_k}:  dL/dz = sum_k s * g_k * p_{D_k} * (onehot(D_k) - p_k).  The softmax is written out
    too, reusing the max the jitter mask already needs: PyTorch's CPU softmax is slow on rows as short
    as E = 8 (benchmarks/gate.py; docs/RESULTS.md).
    """

    @staticmethod
    def forward(ctx, scores_SE: torch.Tensor, coins_KS2: Optional[torch.Tensor], top_k: int, jitter_eps: float,
                training: bool, rule: EstimatorRule) -> Tuple[torch.Tensor, torch.Tensor]:
        experts_SK, weights_SK, p_chosen_SK, probs = _rounds_forward(
            scores_SE, coins_KS2, top_k, jitter_eps, training, rule.c_low, rule.q, rule.exempt_argmax)
        ctx.save_for_backward(experts_SK, p_chosen_SK, *probs)
        ctx.s = rule.s
        ctx.mark_non_differentiable(experts_SK)
        return experts_SK, weights_SK

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_experts, grad_weights_SK: torch.Tensor):
        experts_SK, p_chosen_SK, *probs = ctx.saved_tensors
        return _rounds_backward(probs, experts_SK, p_chosen_SK, grad_weights_SK, ctx.s), None, None, None, None, None


# ---- The fused path: the same two functions, compiled (inductor: C++ on CPU, Triton on GPU). ----

def _fused_forward_fn(scores_SE, coins_KS2, constants_5, top_k: int, training: bool):
    jitter_eps, c_low, q, exempt_argmax, _ = constants_5.unbind()
    experts_SK, weights_SK, _, _ = _rounds_forward(scores_SE, coins_KS2, top_k, jitter_eps, training, c_low, q,
                                                   exempt_argmax > 0)
    return experts_SK, weights_SK


def _fused_backward_fn(scores_SE, experts_SK, grad_weights_SK, constants_5):
    # The rounds' probabilities are recomputed from the logits and the draws rather than saved:
    # inside one kernel that costs less than reading K saved [S, E] tensors back, and it saves their memory.
    jitter_eps, s = constants_5[0], constants_5[4]
    probs, p_chosen = [], []
    for k in range(experts_SK.shape[1]):
        if k:
            scores_SE = scores_SE.scatter(1, experts_SK[:, k - 1:k], float("-inf"))
        probs_SE = _masked_softmax(scores_SE, jitter_eps, sampling=False)[0]
        probs.append(probs_SE)
        p_chosen.append(probs_SE.gather(1, experts_SK[:, k:k + 1]).squeeze(1))
    return _rounds_backward(probs, experts_SK, torch.stack(p_chosen, dim=1), grad_weights_SK, s)


# One graph per (top_k, training) for every estimator, jitter_eps and token count S: the estimator's
# constants come in as a tensor (a Python float would be a guard, and each estimator a recompile),
# and S is marked dynamic on each call, while E stays static so that the loops over a row's experts
# compile to fixed-length vector code.
# Made on first use: torch.compile imports dynamo (about a second), which a process that never fuses
# (the eager path, the command line) should not pay.
_COMPILED: dict = {}
_CONSTANTS: dict = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=None)
    return _COMPILED[fn]


def _constants(device: torch.device, jitter_eps: float, rule: EstimatorRule) -> torch.Tensor:
    """[jitter_eps, c_low, q, exempt_argmax, s] on ``device``, made once per (device, eps, rule)."""
    key = (device, jitter_eps, rule)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor([jitter_eps, rule.c_low, rule.q, float(rule.exempt_argmax), rule.s],
                                       device=device)
    return _CONSTANTS[key]


def _tokens_dynamic(*tensors: Optional[torch.Tensor]) -> None:
    for tensor in tensors:
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 1 if tensor.dim() == 3 else 0)  # coins_KS2: S is dim 1


class _FusedRounds(torch.autograd.Function):
    """``_Rounds`` with its forward and backward compiled; saves only the logits and the draws."""

    @staticmethod
    def forward(ctx, scores_SE: torch.Tensor, coins_KS2: Optional[torch.Tensor], top_k: int, jitter_eps: float,
                training: bool, rule: EstimatorRule) -> Tuple[torch.Tensor, torch.Tensor]:
        constants_5 = _constants(scores_SE.device, jitter_eps, rule)
        _tokens_dynamic(scores_SE, coins_KS2)
        experts_SK, weights_SK = _compiled(_fused_forward_fn)(scores_SE, coins_KS2, constants_5, top_k, training)
        ctx.save_for_backward(scores_SE, experts_SK, constants_5)
        ctx.mark_non_differentiable(experts_SK)
        return experts_SK, weights_SK

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_experts, grad_weights_SK: torch.Tensor):
        scores_SE, experts_SK, constants_5 = ctx.saved_tensors
        grad_weights_SK = grad_weights_SK.contiguous()
        _tokens_dynamic(scores_SE, experts_SK, grad_weights_SK)
        grad_SE = _compiled(_fused_backward_fn)(scores_SE, experts_SK, grad_weights_SK, constants_5)
        return grad_SE, None, None, None, None, None


def compiler_available(device: torch.device) -> bool:
    """Whether inductor can compile for ``device``: Triton on a GPU, a C++ compiler on the CPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return has_triton()
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            get_cpp_compiler()
        except Exception:  # inductor raises its own error types when no compiler is found
            return False
        return True
    return False


# Below this many logits per call (S x E) the eager path is as fast on the CPU: a compiled call's
# fixed cost (guards, the C++ wrapper) outweighs the passes it saves. Measured on 2 cores with
# ``python benchmarks/gate.py --sizes``: fused/eager 1.00x (top-1) and 0.83x (top-2) at 2048-4096
# logits, 0.37x-0.93x above.
CPU_FUSED_MIN_LOGITS = 1 << 12


def check_impl(impl: str, device: torch.device) -> None:
    """Refuse an unknown ``impl``, or "fused" where nothing can compile it, naming the fix."""
    if impl not in ROUTING_IMPLS:
        raise ValueError(f"routing_impl must be one of {', '.join(ROUTING_IMPLS)}; got {impl!r}")
    if impl == "fused" and not compiler_available(device):
        need = "Triton" if device.type == "cuda" else "a C++ compiler (g++ or clang++)"
        raise ValueError(f"routing impl 'fused' needs {need} on {device.type}, and none was found; install it or "
                         "use 'auto' (eager where nothing compiles) or 'eager'")


def use_fused(impl: str, logits_SE: torch.Tensor) -> bool:
    """Whether this call runs the fused kernels: always for "fused", never for "eager", and for
    "auto" where a compiler is available and the call is large enough to gain (any size on a GPU,
    where the eager path is a chain of small kernel launches). Inside an outer torch.compile the
    eager formulation is traced instead, and that compile fuses it with its neighbours."""
    if impl == "eager" or torch.compiler.is_compiling():
        return False
    if impl == "fused":
        return True
    device = logits_SE.device
    if device.type == "cpu" and logits_SE.numel() < CPU_FUSED_MIN_LOGITS:
        return False
    return _compiler_available_cached(device.type)


_COMPILERS: dict = {}


def _compiler_available_cached(device_type: str) -> bool:
    if device_type not in _COMPILERS:
        _COMPILERS[device_type] = compiler_available(torch.device(device_type))
    return _COMPILERS[device_type]
