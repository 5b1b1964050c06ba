"""Divergences by name, as token-loss callables the chunked engine (and the trainers) consume.

A *token loss* is any callable ``(student_logits (N, V), teacher_logits (N, V)) -> (N,)`` returning float32
per-position losses (already scaled, e.g. by T^2). A divergence is a *kernel* on float32 log-probabilities,
``kernel(log_q (N, V), log_p (N, V), **params) -> (N,)`` (student first), registered by name with
:func:`register_divergence`; its hyperparameters are the kernel's keyword parameters, their defaults the kernel's
defaults, and :func:`get_divergence` checks what it is given against that signature. Adding a divergence costs one
kernel (:mod:`llmkd.losses.divergences`), one :func:`register_divergence` line, and one entry in the tests'
reference table (``tests/divergence_reference.py``); every test that loops over :data:`DIVERGENCES` then covers it.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .divergences import (
    alpha_beta_per_token,
    forward_kl_per_token,
    jsd_per_token,
    reverse_kl_per_token,
    skew_forward_kl_per_token,
    skew_reverse_kl_per_token,
    softened_log_probs,
    tvd_per_token,
)
from .fused import FusedKL

Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class RegisteredDivergence:
    """A divergence kernel and its hyperparameters (``name -> default``, read from the kernel's signature)."""

    name: str
    kernel: Kernel
    defaults: dict[str, Any]


#: canonical name -> :class:`RegisteredDivergence`, in registration order
DIVERGENCES: dict[str, RegisteredDivergence] = {}
#: other accepted name -> canonical name
ALIASES: dict[str, str] = {}


def register_divergence(name: str, kernel: Kernel, *, aliases: tuple[str, ...] = ()) -> RegisteredDivergence:
    """Make ``kernel`` available as ``get_divergence(name)`` (and as ``divergence: name`` in every config).

    ``kernel(log_q, log_p, **params)`` takes the student's and the teacher's float32 log-probabilities
    ``(N, V)`` (rows may hold ``-inf``: zero-probability tokens) and returns ``(N,)``, unscaled (the
    :class:`Divergence` applies ``T^2``); every further parameter must be keyword-able and have a default, and it
    should raise ``ValueError`` on a value outside its domain (:func:`get_divergence` calls it once on a probe to
    validate eagerly). Raises ``ValueError`` if the name or an alias is taken or the signature does not fit.
    """
    parameters = list(inspect.signature(kernel).parameters.values())
    if len(parameters) < 2 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters[:2]):
        raise ValueError(f"A divergence kernel takes (log_q, log_p, **params); {kernel.__qualname__} does not.")
    defaults = {}
    for parameter in parameters[2:]:
        if parameter.default is inspect.Parameter.empty or parameter.kind in (parameter.VAR_POSITIONAL,
                                                                              parameter.VAR_KEYWORD):
            raise ValueError(f"Every hyperparameter of a divergence kernel needs a default; {kernel.__qualname__}'s "
                             f"{parameter.name!r} has none.")
        defaults[parameter.name] = parameter.default
    for key in (name, *aliases):
        if key in DIVERGENCES or key in ALIASES:
            raise ValueError(f"The divergence name {key!r} is already registered.")
    entry = RegisteredDivergence(name, kernel, defaults)
    DIVERGENCES[name] = entry
    ALIASES.update({alias: name for alias in aliases})
    return entry


register_divergence("fkl", forward_kl_per_token, aliases=("forward_kl", "kl"))
register_divergence("rkl", reverse_kl_per_token, aliases=("reverse_kl",))
register_divergence("jsd", jsd_per_token, aliases=("generalized_jsd",))
register_divergence("skew_fkl", skew_forward_kl_per_token, aliases=("skew_forward_kl",))
register_divergence("skew_rkl", skew_reverse_kl_per_token, aliases=("skew_reverse_kl",))
register_divergence("tvd", tvd_per_token)
register_divergence("abkd", alpha_beta_per_token, aliases=("alpha_beta",))


def canonical_divergence_name(name: str) -> str:
    """The registered name of ``name`` (an alias such as ``forward_kl`` -> ``fkl``); a ``ValueError`` that lists
    the choices and suggests the closest one for an unknown name."""
    canonical = ALIASES.get(name, name)
    if canonical not in DIVERGENCES:
        choices = sorted(set(DIVERGENCES) | set(ALIASES))
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown divergence {name!r}; choose one of {choices}.{hint}")
    return canonical


@dataclass(frozen=True)
class Divergence:
    """A named divergence with its temperature and hyperparameters, callable as a token loss.

    ``__call__(student_logits (N, V), teacher_logits (N, V)) -> (N,)`` float32, scaled by ``T^2`` unless
    ``scale_by_t2`` is False (SinKD's KD term follows its paper and official code: no ``T^2``).
    """

    name: str
    temperature: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    scale_by_t2: bool = True

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``(N, V)``, ``(N, V)`` -> ``(N,)``. A cached top-k teacher enters densified
        (:meth:`~llmkd.losses.SparseTeacher.logits`; the engine does it), which makes every f-divergence equal to
        its top-k + tail-bucket value exactly (see :mod:`.sparse_teacher`)."""
        kernel = DIVERGENCES[self.name].kernel
        log_q = softened_log_probs(student_logits, self.temperature)
        log_p = softened_log_probs(teacher_logits, self.temperature)
        losses = kernel(log_q, log_p, **self.params)
        return losses * (self.temperature**2) if self.scale_by_t2 else losses

    def fused_kl(self) -> FusedKL | None:
        """Forward KL is ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``: the chunked engine computes it (and its
        gradient) in closed form (:mod:`.fused`). The other divergences return None and run through autograd."""
        if self.name != "fkl":
            return None
        return FusedKL(temperature=self.temperature, factor=self.temperature**2 if self.scale_by_t2 else 1.0)


def get_divergence(name: str, *, temperature: float = 1.0, beta: float | None = None, alpha: float | None = None,
                   scale_by_t2: bool = True, **params: Any) -> Divergence:
    """Build a :class:`Divergence` by name (any of :data:`DIVERGENCES` or an alias such as ``forward_kl``).

    ``params`` are the divergence's own hyperparameters (``get_divergence("abkd", ab_alpha=0.5, ab_beta=0.5)``):
    each must be a keyword parameter of its kernel (a ``ValueError`` names the accepted ones), the rest keep the
    kernel's defaults, and the values are validated here, once, rather than at the first training step.
    ``beta`` and ``alpha`` are the configs' shared knobs ``jsd_beta`` and ``skew_alpha``: they set the parameter of
    that name of whichever divergence has one (``jsd``'s beta, the skew KLs' alpha) and are ignored by the others.
    """
    canonical = canonical_divergence_name(name)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    entry = DIVERGENCES[canonical]
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        accepted = ", ".join(f"{key}={value!r}" for key, value in entry.defaults.items()) or "none"
        raise ValueError(f"The divergence {canonical!r} has no parameter {', '.join(map(repr, unknown))}; its "
                         f"parameters (with their defaults) are: {accepted}.")
    shared = {key: value for key, value in (("beta", beta), ("alpha", alpha))
              if value is not None and key in entry.defaults and key not in params}
    resolved = {**entry.defaults, **shared, **params}
    # validate hyperparameters once, here, rather than at the first training step
    probe = torch.zeros(1, 2)
    entry.kernel(probe, probe, **resolved)
    return Divergence(canonical, temperature, resolved, scale_by_t2)
