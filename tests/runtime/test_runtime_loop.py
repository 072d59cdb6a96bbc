"""fp16 loss scaling, clipping, LR schedule and the pass rule, on the CPU with real torch."""

from __future__ import annotations

import itertools

import pytest
import torch
from qwen_ft_runtime.loop import LoopConfig, lr_at, make_scaler, optimizer_step, train_state_bytes
from qwen_ft_runtime.smoke import loss_decreased

pytestmark = pytest.mark.torch

CPU = torch.device("cpu")


def _sgd_param() -> tuple[torch.nn.Parameter, torch.optim.SGD]:
    weight = torch.nn.Parameter(torch.zeros(4))
    return weight, torch.optim.SGD([weight], lr=1.0)


def test_fp16_scaler_is_on_only_for_fp16() -> None:
    assert make_scaler("fp16", CPU).is_enabled()
    assert not make_scaler("bf16", CPU).is_enabled()
    assert not make_scaler("fp32", CPU).is_enabled()


def test_clipping_sees_unscaled_gradients() -> None:
    # d(loss)/dw = 10 per element: true norm 20. Clipping to 1 leaves 0.5 each, so one SGD
    # step with lr 1 lands on -0.5. Clipping the *scaled* gradients would move w by ~1e-5.
    weight, optimizer = _sgd_param()
    scaler = make_scaler("fp16", CPU)
    loss = (weight * 10).sum()
    grad_norm, skipped = optimizer_step(loss, [weight], optimizer, scaler, max_grad_norm=1.0)
    assert grad_norm == pytest.approx(20.0)
    assert not skipped
    assert torch.allclose(weight.detach(), torch.full((4,), -0.5))
    assert weight.grad is None  # zeroed for the next step


def test_fp16_overflow_skips_the_step_and_halves_the_scale() -> None:
    weight, optimizer = _sgd_param()
    scaler = make_scaler("fp16", CPU)
    before = scaler.get_scale()
    # The scaled gradient (65536) exceeds fp16's max (65504) on its way back through the
    # half-precision activation: real inf gradients, as a too-high scale produces in a model.
    loss = (weight.half() * 3).float().sum()
    grad_norm, skipped = optimizer_step(loss, [weight], optimizer, scaler, max_grad_norm=1.0)
    assert skipped
    assert grad_norm == float("inf")
    assert scaler.get_scale() == before / 2
    assert torch.equal(weight.detach(), torch.zeros(4))  # the update was not applied

    # The next ordinary step goes through at the reduced scale.
    loss = (weight * 2).sum()
    _, skipped = optimizer_step(loss, [weight], optimizer, scaler, max_grad_norm=100.0)
    assert not skipped
    assert torch.allclose(weight.detach(), torch.full((4,), -2.0))


def test_without_scaler_nonfinite_gradients_are_not_applied() -> None:
    weight, optimizer = _sgd_param()
    loss = (weight * float("nan")).sum()
    grad_norm, _ = optimizer_step(loss, [weight], optimizer, make_scaler("fp32", CPU), 1.0)
    assert grad_norm != grad_norm  # NaN, reported by the loop as a failure
    assert torch.equal(weight.detach(), torch.zeros(4))


def test_lr_schedule() -> None:
    constant = LoopConfig(steps=8, lr=1e-3, dtype="fp32", batch_size=1)
    assert {lr_at(s, constant) for s in range(8)} == {1e-3}
    cosine = LoopConfig(steps=10, lr=1e-3, dtype="fp32", batch_size=1, schedule="cosine", warmup_steps=2)
    lrs = [lr_at(s, cosine) for s in range(10)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    assert lrs[-1] < 1e-4


def test_pass_rule_is_last_quarter_mean_below_first_loss() -> None:
    assert loss_decreased([6.0, 5.9, 5.8, 5.7, 5.6, 5.5, 5.4, 5.3])
    assert not loss_decreased([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 6.5, 6.0])  # mean(6.5, 6.0) > 6.0
    assert not loss_decreased([6.0])


def test_train_state_bytes_counts_weights_grads_and_adamw_state() -> None:
    # Linear(3, 4): 12 + 4 fp32 weights. Trainable: weights 64 B, gradients 64 B, AdamW's two
    # moments 128 B and one fp32 step scalar per tensor 8 B. A frozen fp16 tensor adds only itself.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    frozen = torch.nn.Parameter(torch.zeros(10, dtype=torch.float16), requires_grad=False)
    model.register_parameter("frozen", frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    assert train_state_bytes(model, optimizer) == 64 + 64 + 128 + 8 + 20
