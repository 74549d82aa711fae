"""esa.recompute: a recomputed function's gradient and Hessian-vector product are the plain
graph's, by its inputs, the parameters it reads and the incoming gradient."""

import pytest
import torch

from esa.recompute import recomputed

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 7).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(3, dtype=torch.float64, requires_grad=True)  # the incoming gradient depends on it
    return layer, x, scale


def _f(layer, x):
    return torch.tanh(layer(x)).square().sum(-1)


def _gradient_and_hvp(y_of, layer, x, scale, u):
    """The gradient of sum(scale * y) by (x, weight, bias, scale), and its product with ``u``."""
    by = [x, layer.weight, layer.bias, scale]
    grads = torch.autograd.grad((scale * y_of()).sum(), by, create_graph=True)
    return grads, torch.autograd.grad(grads, by, u)


def test_gradient_and_hvp_are_the_plain_graphs():
    layer, x, scale = _setup()
    u = [torch.randn_like(t) for t in (x, layer.weight, layer.bias, scale)]
    plain = _gradient_and_hvp(lambda: _f(layer, x), layer, x, scale, u)
    again = _gradient_and_hvp(lambda: recomputed(lambda h: _f(layer, h), (x,), list(layer.parameters())),
                              layer, x, scale, u)
    for expected, actual in zip(plain, again):
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_only_inputs_that_need_gradients_get_them():
    layer, x, scale = _setup()
    layer.requires_grad_(False)
    y = recomputed(lambda h, k: _f(layer, h) * k, (x, torch.ones(3, dtype=torch.float64)), list(layer.parameters()))
    (grad_x,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(grad_x, torch.autograd.grad(_f(layer, x).sum(), [x])[0], rtol=1e-12, atol=1e-12)
