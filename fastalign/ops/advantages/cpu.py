"""The compiled backends of the advantage ops (csrc/cpu/advantages.cpp; CUDA scans in csrc/cuda/advantages.cu)."""

from __future__ import annotations

import torch

from .. import native
from ..native import f32 as _f32
from ..native import grad as _grad
from ..native import weights as _weights
from .spec import AdvantageScale


class _GroupAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, group_size, scale, eps):
        ctx.save_for_backward(rewards)
        ctx.args = (group_size, scale, eps)
        return torch.ops.fastalign.group_advantages(rewards, group_size, scale, eps)

    @staticmethod
    def backward(ctx, grad):
        (rewards,) = ctx.saved_tensors
        return torch.ops.fastalign.group_advantages_bwd(_grad(grad), rewards, *ctx.args), None, None, None


def group_advantages_native(rewards, group_size, *, scale, eps):
    return _GroupAdvantages.apply(_f32(rewards), group_size, AdvantageScale.code(scale, "scale"), eps)


class _RlooAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, group_size):
        ctx.group_size = group_size
        return torch.ops.fastalign.rloo_advantages(rewards, group_size)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.fastalign.rloo_advantages_bwd(_grad(grad), ctx.group_size), None


def rloo_advantages_native(rewards, group_size):
    return _RlooAdvantages.apply(_f32(rewards), group_size)


class _Gae(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, values, mask, gamma, lam):
        ctx.save_for_backward(mask)  # the backward scan needs only the mask
        ctx.args = (gamma, lam)
        return torch.ops.fastalign.gae(rewards, values, mask, gamma, lam)

    @staticmethod
    def backward(ctx, grad_adv, grad_ret):
        (mask,) = ctx.saved_tensors
        d_rewards, d_values = torch.ops.fastalign.gae_bwd(_grad(grad_adv), _grad(grad_ret), mask, *ctx.args)
        return d_rewards, d_values, None, None, None


def gae_native(rewards, values, mask, *, gamma, lam):
    return _Gae.apply(_f32(rewards), _f32(values), _weights(mask), gamma, lam)


class _Whiten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, shift_mean, eps):
        out, stats = torch.ops.fastalign.whiten_fwd(x, mask, shift_mean, eps)
        ctx.save_for_backward(x, mask, stats)
        ctx.shift_mean = shift_mean
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mask, stats = ctx.saved_tensors
        return torch.ops.fastalign.whiten_bwd(_grad(grad), x, mask, stats, ctx.shift_mean), None, None, None


def whiten_native(x, mask, *, shift_mean, eps):
    return _Whiten.apply(_f32(x), _weights(mask), shift_mean, eps)


def _register_fakes() -> None:
    fake = torch.library.register_fake
    like = torch.empty_like
    fake("fastalign::group_advantages")(lambda rewards, group_size, scale, eps: like(rewards))
    fake("fastalign::group_advantages_bwd")(lambda grad, rewards, group_size, scale, eps: like(rewards))
    fake("fastalign::rloo_advantages")(lambda rewards, group_size: like(rewards))
    fake("fastalign::rloo_advantages_bwd")(lambda grad, group_size: like(grad))
    fake("fastalign::gae")(lambda rewards, values, mask, gamma, lam: (like(rewards), like(rewards)))
    fake("fastalign::gae_bwd")(lambda grad_adv, grad_ret, mask, gamma, lam: (like(mask), like(mask)))
    fake("fastalign::whiten_fwd")(lambda x, mask, shift_mean, eps: (like(x), x.new_empty(4)))
    fake("fastalign::whiten_bwd")(lambda grad, x, mask, stats, shift_mean: like(x))


if native.has_op("group_advantages"):
    _register_fakes()
    # The scans and segmented reductions also have CUDA kernels (csrc/cuda); whiten runs on CUDA via torch.
    native.register("group_advantages", group_advantages_native, cuda=True)
    native.register("rloo_advantages", rloo_advantages_native, cuda=True)
    native.register("gae", gae_native, cuda=True)
    native.register("whiten", whiten_native)
