"""The tests' one-tensor calls of a backend module: a plan and a record built from keywords, stepped in two phases."""

import importlib

import pytest
import torch

from online_merging.kernels.plan import Plan, Record
from online_merging.merging import topk_cut
from online_merging.optim import functional

PIECE_KEYS = ("offset", "update_cut", "tau_cut", "mask", "binding")


def interpreted_triton():
    """The Triton backend with interpreted kernels (Triton reads TRITON_INTERPRET when a kernel is decorated: its
    modules are reloaded under it when imported before)."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        module = importlib.import_module("online_merging.kernels.triton")
        if not isinstance(module._adam_kernel, InterpretedFunction):
            importlib.reload(importlib.import_module("online_merging.kernels.triton_topk"))
            module = importlib.reload(module)
    return module


def adam_step(module, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, merge_buffer, tau, *, step, name, settings,
              **hyper):  # fmt: skip
    """One AdamW step of ``param`` by ``module``; ``hyper``: the plan's keywords and the record's piece keywords
    (and its ``binding``, kept across steps as the optimizer keeps it)."""
    where = {key: hyper.pop(key) for key in PIECE_KEYS if key in hyper}
    record = Record(
        param, grad, step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, max_exp_avg_sq=max_exp_avg_sq,
        merge_buffer=merge_buffer, tau=tau, name=name, **where,
    )  # fmt: skip
    return _run(module, Plan("adam", settings, **hyper), record)


def sgd_step(module, param, grad, momentum_buffer, merge_buffer, tau, *, step, name, settings, first_momentum,
             **hyper):  # fmt: skip
    """One SGD step of ``param`` by ``module`` (see :func:`adam_step`)."""
    where = {key: hyper.pop(key) for key in PIECE_KEYS if key in hyper}
    record = Record(
        param, grad, step, momentum_buffer=momentum_buffer, first_momentum=first_momentum,
        merge_buffer=merge_buffer, tau=tau, name=name, **where,
    )  # fmt: skip
    return _run(module, Plan("sgd", settings, **hyper), record)


def _run(module, plan, record):
    """Step ``record``; when its update cut is a PendingCut, return its Δ and the rest of the step, a function of
    Δ's cut."""
    (total,) = module.step(plan, [record])
    if total is None:
        return None
    if record.cut_pending:
        return total, lambda cut: functional.finish_ties(module, plan, record, total, cut)
    functional.finish_ties(module, plan, record, total, record.update_cut(total))
    return None


def step_pieces(module, plan, records, k):
    """Step the pieces of one tensor by ``module``; under OnTIES, merge each with the top-k cut of their joined Δ."""
    totals = module.step(plan, records)
    if totals[0] is not None:
        cut = topk_cut(torch.cat(totals), k)
        for record, total in zip(records, totals, strict=True):
            module.ties_merge(plan, record, total, cut, plan.tau_cut(record))
