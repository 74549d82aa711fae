"""A checkpoint whose backward AND double backward recompute the function: ``recomputed(fn,
inputs, params)`` is ``fn(*inputs)``, keeping only ``inputs`` for autograd.

For ``y = f(x)`` (x: the inputs and the parameters ``fn`` reads, those that require grad) and
the incoming gradient ``v`` of y, backward returns the vector-Jacobian product

    g(x, v) = J_f(x)^T v,

recomputing f. Under ``create_graph`` g is itself a node that keeps only (x, v); a
Hessian-vector product through it (cotangent ``u`` of g) gets

    d<g, u>/dx = sum_k v_k H_{f_k}(x) u,    d<g, u>/dv = J_f(x) u,

from a second recomputation of f and g. ``torch.utils.checkpoint`` recomputes f once: under
``create_graph`` that recomputed graph and its backward's graph stay for the double backward
(for the LM head about one fp32 logit per position and vocabulary entry, every chunk's at once).
Here a recomputation lives only while its own product is taken. Each step runs the autograd
operations of the plain graph, so the values are the uncheckpointed function's. A third
derivative is not supported.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _vjp(fn, inputs, params, wanted, v, create_graph):
    """The inputs as fresh leaves (the wanted ones), and ``J^T v`` by every wanted input and
    parameter (the parameters are leaves already, read by ``fn`` itself)."""
    leaves = [x.detach().requires_grad_() if want else x for x, want in zip(inputs, wanted)]
    by = [t for t, want in zip([*leaves, *params], wanted) if want]
    grads = torch.autograd.grad(fn(*leaves), by, v, create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    return leaves, by, grads


class _VectorJacobian(torch.autograd.Function):
    """``g(x, v) = J_f(x)^T v`` for the wanted x, by recomputation; its backward the module
    docstring's products."""

    @staticmethod
    def forward(ctx, fn, wanted, v, n_inputs, *tensors):
        ctx.fn, ctx.wanted, ctx.params = fn, wanted, tensors[n_inputs:]
        ctx.save_for_backward(v, *tensors[:n_inputs])
        with torch.enable_grad():
            return _vjp(fn, tensors[:n_inputs], ctx.params, wanted, v, create_graph=False)[2]

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents):
        v, *inputs = ctx.saved_tensors
        by_v = ctx.needs_input_grad[2]
        with torch.enable_grad():
            v = v.detach().requires_grad_(by_v)
            _, by, grads = _vjp(ctx.fn, inputs, ctx.params, ctx.wanted, v, create_graph=True)
            second = torch.autograd.grad(grads, [v, *by] if by_v else by, cotangents, allow_unused=True,
                                         materialize_grads=True)
        dv, second = (second[0], second[1:]) if by_v else (None, second)
        second = iter(second)
        return (None, None, dv, None, *(next(second) if want else None for want in ctx.wanted))


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_inputs, *tensors):
        ctx.fn, ctx.n_inputs, ctx.params = fn, n_inputs, tensors[n_inputs:]
        ctx.save_for_backward(*tensors[:n_inputs])
        return fn(*tensors[:n_inputs])

    @staticmethod
    def backward(ctx, v):
        wanted = ctx.needs_input_grad[2:]
        grads = iter(_VectorJacobian.apply(ctx.fn, wanted, v, ctx.n_inputs, *ctx.saved_tensors, *ctx.params))
        return (None, None, *(next(grads) if want else None for want in wanted))


def recomputed(fn, inputs: tuple[torch.Tensor, ...], params) -> torch.Tensor:
    """``fn(*inputs)`` (one tensor), its backward and double backward recomputed (module
    docstring); ``params``: the parameters ``fn`` reads itself (a module's), so that their
    gradients flow."""
    return _Recomputed.apply(fn, len(inputs), *inputs, *params)
