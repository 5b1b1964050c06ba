"""Naive float64 references of SinKD's Sinkhorn term, written from the formulas (docs/ALGORITHMS.md section 2):
the cost by explicit loops, the plan in the plain domain as the paper writes it."""

from __future__ import annotations

import torch


def reference_cost(ps, pt):
    """W_ij = sum_v |ps[i, v] - pt[j, v]|, by explicit loops over i and j."""
    n = ps.shape[0]
    rows = []
    for i in range(n):
        rows.append(torch.stack([(ps[i] - pt[j]).abs().sum() for j in range(n)]))
    return torch.stack(rows)


def reference_plan(cost, eps, iterations):
    """Plain-domain Sinkhorn with unit marginals: K = exp(-W/eps); rows then columns normalised."""
    plan = torch.exp(-cost / eps)
    for _ in range(iterations):
        plan = plan / plan.sum(dim=1, keepdim=True)
        plan = plan / plan.sum(dim=0, keepdim=True)
    return plan


def reference_sinkhorn(zs, zt, tau=2.0, eps=0.1, iterations=20, scale=1e-3, detach_plan=True):
    ps = torch.softmax(zs.double() / tau, dim=-1)
    pt = torch.softmax(zt.double() / tau, dim=-1)
    cost = reference_cost(ps, pt)
    plan = reference_plan(cost.detach() if detach_plan else cost, eps, iterations)
    return scale * (plan * cost).sum()
