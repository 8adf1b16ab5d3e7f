"""Compiling the transformer blocks (train.compile, synth.compile) falls back to eager, with one warning,
when compilation fails (a real torch.compile whose backend fails; compiling the Flux blocks with Inductor
is left to the GPU tests: too slow here)."""

from __future__ import annotations

import logging

import pytest
import torch

from dermaflux.model.compile import compile_blocks


class Blocks(torch.nn.Module):
    """A model shaped like FluxTransformer2DModel's block lists, without `_repeated_blocks`."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.single_transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    def forward(self, x):
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            x = torch.tanh(block(x))
        return x


def failing_backend(graph, example_inputs):
    raise RuntimeError("forced: the backend cannot compile this graph")


@pytest.fixture
def default_stance():
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def test_failed_compilation_runs_eager_with_one_warning(default_stance, caplog):
    torch.manual_seed(0)
    model = Blocks()
    x = torch.randn(3, 4, requires_grad=True)
    expected = model(x).detach()

    def probe():
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    with caplog.at_level(logging.WARNING, logger="dermaflux.model.compile"):
        assert compile_blocks(model, probe, backend=failing_backend) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "forced" in warnings[0].getMessage() and "eager" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # the compiled blocks now run eager: no new attempt, no new warning
            torch.testing.assert_close(model(x).detach(), expected)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(p.grad is None for p in model.parameters())  # the probe left no gradients behind


def test_a_model_without_blocks_is_refused_as_a_failure(default_stance, caplog):
    with caplog.at_level(logging.WARNING, logger="dermaflux.model.compile"):
        assert compile_blocks(torch.nn.Linear(2, 2), lambda: None) is False
    assert "no transformer_blocks" in caplog.text
