"""Gradient fidelity: how close is each estimator's expected router gradient to the exact one?

A routing problem small enough to solve exactly: E experts with fixed outputs f_i (vectors of size
m), learnable logits z, one token, jitter masking off. The expected loss J(z) = E_{D~p}[L(p_D f_D)]
has the exact gradient g = dJ/dz by enumerating every expert. Each estimator's gradient ghat(D, c)
follows its rule: forward value w = c p_D, router gradient s * dL/dw * dp_D/dz. Its expectation and
spread are computed two ways:
- exactly, enumerating D ~ p and the coin c, which separates bias from noise;
- by sampling through the real routing function (sparsemixer_ds.sparsemixer), which checks the
  implementation against the enumeration.
Reported, averaged over random problems, for a quadratic and a cubic loss: cosine(E ghat, g),
relative bias ||E ghat - g|| / ||g||, relative standard deviation sqrt(E||ghat - E ghat||^2) / ||g||.

    python benchmarks/fidelity.py            # the docs' table
    python benchmarks/fidelity.py --smoke    # few problems, fewer samples (CI)
"""
import argparse
import json
import math
from pathlib import Path

import torch

from sparsemixer_ds import sparsemixer
from sparsemixer_ds.routing.registry import ESTIMATORS

# Arm -> (estimator rule name, routes by argmax). "switch" is Switch/GShard's gating-only gradient:
# D = argmax, weight p_D, the plain derivative of p_D.
ARMS = {
    "switch": ("sampled", True),
    "sampled": ("sampled", False),
    "euler": ("euler", False),
    "midpoint": ("midpoint", False),
    "midpoint-all": ("midpoint-all", False),
    "heun3": ("heun3", False),
}
NO_MASK = 1e6  # a jitter_eps no logit gap can exceed: nothing is masked


def quadratic(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((h - t)**2).sum(-1)


def cubic(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    d = h - t
    return 0.5 * (d**2).sum(-1) + (d**3).sum(-1) / 6.0


LOSSES = {"quadratic": quadratic, "cubic": cubic}


def exact_gradient(z: torch.Tensor, f: torch.Tensor, t: torch.Tensor, loss) -> torch.Tensor:
    """dJ/dz for J = sum_D p_D L(p_D f_D), every expert enumerated."""
    z = z.detach().clone().requires_grad_()
    p = torch.softmax(z, dim=0)
    J = (p * loss(p[:, None] * f, t)).sum()
    (grad, ) = torch.autograd.grad(J, z)
    return grad


def estimator_moments(z, f, t, loss, arm):
    """Exact mean and variance (trace) of an arm's gradient over D and the coin."""
    rule_name, by_argmax = ARMS[arm]
    rule = ESTIMATORS[rule_name]
    p = torch.softmax(z, dim=0)
    E = z.numel()
    argmax = int(p.argmax())
    outcomes = []  # (probability, gradient)
    for d in ([argmax] if by_argmax else range(E)):
        p_d = 1.0 if by_argmax else float(p[d])
        dp_dz = p[d] * (torch.eye(E, dtype=z.dtype)[d] - p)  # d p_D / dz
        coins = [(1.0, 1.0)] if (rule.exempt_argmax and d == argmax) else [(rule.q, 1.0), (1 - rule.q, rule.c_low)]
        for prob_c, c in coins:
            if prob_c == 0:
                continue
            w = (c * p[d]).detach().clone().requires_grad_()
            (dL_dw, ) = torch.autograd.grad(loss(w * f[d], t), w)
            outcomes.append((p_d * prob_c, rule.s * dL_dw * dp_dz))
    mean = sum(prob * g for prob, g in outcomes)
    var = sum(prob * ((g - mean)**2).sum() for prob, g in outcomes)
    return mean, var


def sampled_mean(z, f, t, loss, arm, samples: int) -> torch.Tensor:
    """The arm's average gradient over ``samples`` draws of the real routing function."""
    rule_name, by_argmax = ARMS[arm]
    logits = z.detach().expand(samples, -1).clone().requires_grad_()
    experts, weights = sparsemixer(logits, top_k=1, jitter_eps=NO_MASK, training=not by_argmax, estimator=rule_name)
    h = weights.double() * f[experts[:, 0]]  # (N, m)
    loss(h, t).sum().backward()
    return logits.grad.sum(dim=0) / samples


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def run(problems: int, experts: int, dim: int, samples: int, sampled_problems: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for loss_name, loss in LOSSES.items():
        rows = {arm: {"cosine": [], "bias": [], "std": [], "sampling_error": []} for arm in ARMS}
        for i in range(problems):
            z = torch.randn(experts, generator=gen, dtype=torch.float64)
            f = torch.randn(experts, dim, generator=gen, dtype=torch.float64)
            t = torch.randn(dim, generator=gen, dtype=torch.float64)
            g = exact_gradient(z, f, t, loss)
            for arm in ARMS:
                mean, var = estimator_moments(z, f, t, loss, arm)
                rows[arm]["cosine"].append(cosine(mean, g))
                rows[arm]["bias"].append(float((mean - g).norm() / g.norm()))
                rows[arm]["std"].append(math.sqrt(float(var)) / float(g.norm()))
                if i < sampled_problems:
                    torch.manual_seed(seed + i)
                    mc = sampled_mean(z, f, t, loss, arm, samples)
                    # in units of the Monte-Carlo standard error of the mean gradient; the floor is the
                    # float32 rounding of the routing function, which is all a zero-variance arm shows
                    stderr = math.sqrt(float(var) / samples) + 1e-5 * float(mean.norm())
                    rows[arm]["sampling_error"].append(float((mc - mean).norm()) / stderr)
        results[loss_name] = {
            arm: {key: (sum(v) / len(v) if v else None) for key, v in row.items()} | {
                "max_bias": max(row["bias"]), "max_sampling_error": max(row["sampling_error"], default=None)}
            for arm, row in rows.items()
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=500, help="random problems per loss")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4, help="size of each expert's output")
    parser.add_argument("--samples", type=int, default=200000, help="routing draws per sampled check")
    parser.add_argument("--sampled-problems", type=int, default=20, help="problems also checked by sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="20 problems, 5 sampled with 20k draws (CI)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/fidelity.json"))
    args = parser.parse_args()
    if args.smoke:
        args.problems, args.sampled_problems, args.samples = 20, 5, 20000
    results = run(args.problems, args.experts, args.dim, args.samples, args.sampled_problems, args.seed)
    print(f"router-gradient fidelity: {args.problems} random problems per loss, E={args.experts}, m={args.dim}; "
          f"sampling check on {args.sampled_problems} of them with {args.samples} draws each")
    header = f"{'loss':<10} {'estimator':<13} | {'cosine':>7} {'rel. bias':>10} {'max bias':>9} {'rel. std':>9} | " \
             f"{'sampled vs exact (std errors)':>29}"
    print(header)
    print("-" * len(header))
    for loss_name, arms in results.items():
        for arm, r in arms.items():
            print(f"{loss_name:<10} {arm:<13} | {r['cosine']:>7.4f} {r['bias']:>10.4f} {r['max_bias']:>9.2e} "
                  f"{r['std']:>9.3f} | {r['sampling_error']:>13.2f} mean, {r['max_sampling_error']:>5.2f} max")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                    indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
