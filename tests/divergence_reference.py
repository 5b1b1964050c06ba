"""The divergences of docs/ALGORITHMS.md section 0 written from their formulas on probability vectors (float64): ONE
table, :data:`REFERENCES`, shared by the tests of the dense losses, the chunked engine and the cached top-k teacher.

Every divergence registered in :data:`llmkd.losses.DIVERGENCES` has an entry (``tests/test_losses.py`` checks it);
the tests loop over this table, so a new divergence is tested everywhere once its reference is written here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v), with 0 log 0 = 0 (terms where a_v = 0 are dropped)."""
    pos = a > 0
    one = torch.ones((), dtype=a.dtype)
    safe_a = torch.where(pos, a, one)
    safe_b = torch.where(pos, b, one)
    terms = torch.where(pos, safe_a * (torch.log(safe_a) - torch.log(safe_b)), torch.zeros((), dtype=a.dtype))
    return terms.sum(dim=-1)


def jsd(p, q, beta=0.5):
    """GKD convention: beta = 0 is KL(p || q), beta = 1 is KL(q || p) (the mixture formula's limits)."""
    if beta == 0.0:
        return kl(p, q)
    if beta == 1.0:
        return kl(q, p)
    m = beta * p + (1.0 - beta) * q
    return beta * kl(p, m) + (1.0 - beta) * kl(q, m)


def alpha_beta(p, q, ab_alpha=0.2, ab_beta=0.7):
    """ABKD's D_AB(p || q) (Wang et al., 2025, after Cichocki et al., 2011), straight from the formula:
    ``-1/(ab) sum(p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b))``, and at a parameter 0 the limit of that formula:
    ``1/a^2 sum(p^a log(p^a/q^a) - p^a + q^a)`` (b = 0), ``1/b^2 sum(q^b log(q^b/p^b) - q^b + p^b)`` (a = 0),
    ``1/2 sum(log p - log q)^2`` (a = b = 0); entries where both are 0 are dropped."""
    a, b = ab_alpha, ab_beta
    live = (p > 0) | (q > 0)
    zero = torch.zeros((), dtype=p.dtype)
    p, q = torch.where(live, p, 1.0), torch.where(live, q, 1.0)  # stand-ins, dropped below (no 0 * inf gradient)
    if a > 0 and b > 0:
        terms = -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)) / (a * b)
    elif a > 0 or b > 0:
        c, x, y = (a, p, q) if a > 0 else (b, q, p)
        xc, yc = x**c, y**c
        pos = xc > 0
        log_ratio = torch.where(pos, torch.log(torch.where(pos, xc, 1.0)) - torch.log(torch.where(pos, yc, 1.0)), zero)
        terms = (xc * log_ratio - xc + yc) / c**2
    else:
        terms = 0.5 * (torch.log(p) - torch.log(q)) ** 2
    return torch.where(live, terms, zero).sum(-1)


@dataclass(frozen=True)
class Reference:
    """A divergence's float64 formula ``(p, q, **params) -> (...)`` (teacher ``p``, student ``q``, unscaled), the
    hyperparameter values the tests cover (interior ``cases``; ``limits``: the end points each kernel treats apart)
    and the properties the tests rely on."""

    formula: Callable[..., torch.Tensor]
    cases: tuple[dict[str, Any], ...] = ({},)
    limits: tuple[dict[str, Any], ...] = ()
    #: an f-divergence: zero wherever the two distributions are proportional, so a cached top-k teacher's
    #: densified tail is exact (tests/test_sparse_teacher.py)
    f_divergence: bool = True
    #: finite when the teacher gives 0 probability to a token the student does not
    finite_with_teacher_zeros: bool = True
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(inspect.signature(self.formula).parameters)[2:])


REFERENCES: dict[str, Reference] = {
    "fkl": Reference(lambda p, q: kl(p, q)),
    "rkl": Reference(lambda p, q: kl(q, p), finite_with_teacher_zeros=False),
    "jsd": Reference(jsd, cases=({"beta": 0.5}, {"beta": 0.1}, {"beta": 0.9}),
                     limits=({"beta": 0.0}, {"beta": 1.0})),
    "skew_fkl": Reference(lambda p, q, alpha=0.1: kl(p, alpha * p + (1.0 - alpha) * q),
                          cases=({"alpha": 0.1}, {"alpha": 0.4}), limits=({"alpha": 0.0},)),
    "skew_rkl": Reference(lambda p, q, alpha=0.1: kl(q, alpha * q + (1.0 - alpha) * p),
                          cases=({"alpha": 0.1}, {"alpha": 0.4}), limits=({"alpha": 0.0},)),
    "tvd": Reference(lambda p, q: 0.5 * (p - q).abs().sum(-1)),
    # a + b = 1 is an alpha-divergence (an f-divergence); the default a + b = 0.9 is not
    "abkd": Reference(alpha_beta, cases=({"ab_alpha": 0.2, "ab_beta": 0.7}, {"ab_alpha": 0.5, "ab_beta": 0.5},
                                         {"ab_alpha": 1.2, "ab_beta": 0.3}),
                      limits=({"ab_alpha": 0.5, "ab_beta": 0.0}, {"ab_alpha": 0.0, "ab_beta": 0.6},
                              {"ab_alpha": 0.0, "ab_beta": 0.0}),
                      f_divergence=False),
}


def case_id(name: str, params: dict[str, Any]) -> str:
    return name + "".join(f"-{key}{value}" for key, value in params.items())


#: (name, params) for every interior case of every divergence
CASES = [(name, params) for name, reference in REFERENCES.items() for params in reference.cases]
CASE_IDS = [case_id(name, params) for name, params in CASES]
#: (name, params) for the limits each kernel computes apart
LIMITS = [(name, params) for name, reference in REFERENCES.items() for params in reference.limits]
LIMIT_IDS = [case_id(name, params) for name, params in LIMITS]


def divergence_of_probs(name: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5, alpha: float = 0.1,
                        **params: Any) -> torch.Tensor:
    """The divergence between the teacher's ``p`` and the student's ``q`` (``(..., V)`` -> ``(...)``), unscaled.

    ``beta`` / ``alpha`` are used by the divergence that has a parameter of that name; ``params`` are the others'
    (``ab_alpha``, ``ab_beta``)."""
    reference = REFERENCES[name]
    given = {"beta": beta, "alpha": alpha, **params}
    return reference.formula(p, q, **{key: given[key] for key in reference.params if key in given})
