"""The compiled kernels as ``torch.library`` custom operators (namespace ``safeflow``).

Each operator wraps one raw-pointer call of :class:`~safeflow.kernels.compiled.Compiled` (the
compiled modules stay torch-free): it mutates no argument and returns freshly allocated, contiguous
tensors that alias nothing. Every operator has a fake (meta) implementation giving the outputs'
shapes and dtypes, so ``torch.compile`` traces it without running it, and
``torch.library.opcheck`` checks the registrations. Shapes: H [B, d], W [F, d], b [F], Φ [K, F],
ξ [K]; ``mask`` is the int64 activation bitmask [B, ceil(F/64)] of a forward. An output that was
not asked for (the features, a parameter gradient) comes back as an empty tensor [0].

* ``safeflow::violations``: V [B, K] alone (gradient-free, the cheapest call: steering's);
* ``safeflow::violations_forward``: V [B, K], the bitmask and the features ReLU(H Wᵀ + b) [B, F];
* ``safeflow::violations_vjp_input``: ((C Φ) ⊙ D) W [B, d] for weights C [B, K];
* ``safeflow::violations_param_grads``: ∂W [F, d], ∂b [F] and ∂Φᵀ [F, K];
* ``safeflow::jacobian``: A = Φ D W [B, K, d] and c = ξ − Φ D b [B, K];
* ``safeflow::safeflow_loop``: the SafeFlow loop's new rows [M, d] and steps [M];
* ``safeflow::project`` (CPU only): float64 projections h* [B, d], λ* [B, K] and status [B];
* ``safeflow::projection_steer`` (CPU only): the projection steerer's rows [n, d], rounds and status [n].

``violations_forward`` is differentiable in H, W, b, Φ and ξ (``register_autograd``): its backward
calls ``violations_vjp_input`` and ``violations_param_grads`` (once differentiable: no double
backward). All but the projections have kernels for ``cpu`` and ``cuda`` tensors, registered whether or not
the compiled module of that device loaded (it is imported on first call; importing this module
never needs it); the public functions of :mod:`safeflow.kernels` check the operands and choose
the backend before they call an operator.
"""

from __future__ import annotations

from typing import Any

import torch

from .compiled import IMPLS

#: a CPU training forward keeps the [B, F] features for the backward when they fit in this many
#: bytes (saves recomputing them for ∂Φ); larger batches keep only the bitmask and recompute
FEATURE_BUDGET_BYTES = 16 << 20

_DEVICES = ("cpu", "cuda")


def _given(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t``, or an empty [0] tensor on ``like``'s device (in ``dtype``, default ``like``'s) for an output not asked."""
    return t if t is not None else like.new_empty(0, dtype=dtype)


# --- the violations and their derivatives ----------------------------------------------------


@torch.library.custom_op("safeflow::violations", mutates_args=(), device_types=_DEVICES)
def violations_only(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor,
                    xi: torch.Tensor) -> torch.Tensor:
    """V = ReLU(H Wᵀ + b) Φᵀ − ξ [B, K] without a bitmask: the gradient-free forward (one output, so
    the cheapest dispatch; not differentiable, :func:`violations` calls it only when no gradient is
    being recorded)."""
    return IMPLS[H.device.type].forward(H, W, b, Phi, xi, mask=False)[0]


@violations_only.register_fake
def _(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    return H.new_empty(H.shape[0], Phi.shape[0])


@torch.library.custom_op("safeflow::violations_forward", mutates_args=(), device_types=_DEVICES)
def violations_forward(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                       keep_features: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V = ReLU(H Wᵀ + b) Φᵀ − ξ [B, K], the bitmask [B, ceil(F/64)] and the features [B, F] (if
    ``keep_features``; CPU only)."""
    V, mask, feat = IMPLS[H.device.type].forward(H, W, b, Phi, xi, mask=True, features=keep_features)
    assert mask is not None  # asked for (mask=True)
    return V, mask, _given(feat, H)


@violations_forward.register_fake
def _(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
      keep_features: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, (K, F) = H.shape[0], Phi.shape
    mask = H.new_empty(B, -(-F // 64), dtype=torch.int64)  # ceil(F / 64) words
    return H.new_empty(B, K), mask, H.new_empty((B, F) if keep_features else (0,))


@torch.library.custom_op("safeflow::violations_vjp_input", mutates_args=(), device_types=_DEVICES)
def violations_vjp_input(W: torch.Tensor, Phi: torch.Tensor, mask: torch.Tensor, C: torch.Tensor,
                         V: torch.Tensor | None) -> torch.Tensor:
    """((C Φ) ⊙ D) W [B, d] for weights C [B, K]; rows whose V [B, K] (optional) holds a NaN come back NaN."""
    return IMPLS[C.device.type].vjp_input(W, Phi, mask, C, V)


@violations_vjp_input.register_fake
def _(W: torch.Tensor, Phi: torch.Tensor, mask: torch.Tensor, C: torch.Tensor, V: torch.Tensor | None) -> torch.Tensor:
    return C.new_empty(C.shape[0], W.shape[1])


@torch.library.custom_op("safeflow::violations_param_grads", mutates_args=(), device_types=_DEVICES)
def violations_param_grads(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, mask: torch.Tensor,
                           feat: torch.Tensor | None, C: torch.Tensor, need_W: bool, need_b: bool,
                           need_Phi: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """∂W [F, d], ∂b [F] and ∂Φᵀ [F, K] (transposed) for weights C = ∂L/∂V [B, K]; ``feat``: the
    forward's features, or None to recompute the active ones."""
    gW, gb, gPhiT = IMPLS[H.device.type].param_grads(H, W, b, Phi, mask, C, (need_W, need_b, need_Phi), feat)
    return _given(gW, H), _given(gb, H), _given(gPhiT, H)


@violations_param_grads.register_fake
def _(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, mask: torch.Tensor,
      feat: torch.Tensor | None, C: torch.Tensor, need_W: bool, need_b: bool,
      need_Phi: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (F, d), K = W.shape, Phi.shape[0]
    return (H.new_empty((F, d) if need_W else (0,)), H.new_empty((F,) if need_b else (0,)),
            H.new_empty((F, K) if need_Phi else (0,)))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    H, W, b, Phi, _, _ = inputs
    V, mask, feat = output
    ctx.mark_non_differentiable(mask, feat)  # only V carries a gradient
    ctx.save_for_backward(H, W, b, Phi, mask, V, feat)


def _backward(ctx: Any, gV: torch.Tensor, _gmask: Any, _gfeat: Any) -> tuple[torch.Tensor | None, ...]:
    """∂H = ((gV Φ) ⊙ D) W, ∂W, ∂b, ∂Φ from the bitmask (and the kept features), ∂ξ = −Σ_rows gV."""
    H, W, b, Phi, mask, V, feat = ctx.saved_tensors
    nH, nW, nb, nPhi, nxi = ctx.needs_input_grad[:5]
    gV = gV.contiguous()
    gH = violations_vjp_input(W, Phi, mask, gV, V) if nH else None
    params: tuple[torch.Tensor | None, ...] = (None, None, None)
    if nW or nb or nPhi:
        kept = feat if feat.dim() == 2 else None  # [0]: the forward did not keep them
        gW, gb, gPhiT = violations_param_grads(H, W, b, Phi, mask, kept, gV, nW, nb, nPhi)
        params = (gW if nW else None, gb if nb else None, gPhiT.t() if nPhi else None)
    return gH, *params, (-gV.sum(0) if nxi else None), None


violations_forward.register_autograd(_backward, setup_context=_setup_context)


def violations(H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """V [B, K] on the operands' device, differentiable in every argument: ``safeflow::violations``
    when no gradient is being recorded, else ``safeflow::violations_forward`` keeping the bitmask (and
    the CPU features when Φ needs a gradient and they fit in :data:`FEATURE_BUDGET_BYTES`)."""
    if not (torch.is_grad_enabled() and (H.requires_grad or W.requires_grad or b.requires_grad
                                         or Phi.requires_grad or xi.requires_grad)):
        return violations_only(H, W, b, Phi, xi)
    keep = (Phi.requires_grad and H.device.type == "cpu"
            and H.shape[0] * Phi.shape[1] * H.element_size() <= FEATURE_BUDGET_BYTES)
    return violations_forward(H, W, b, Phi, xi, keep)[0]


# --- the local affine model, the SafeFlow loop, the projections --------------------------------


@torch.library.custom_op("safeflow::jacobian", mutates_args=(), device_types=_DEVICES)
def jacobian(W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Φ D W [B, K, d] and c = ξ − Φ D b [B, K] for the bitmask [B, ceil(F/64)] of a forward."""
    return IMPLS[b.device.type].jacobian(W, b, Phi, xi, mask)


@jacobian.register_fake
def _(W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, K, d = mask.shape[0], Phi.shape[0], W.shape[1]
    return b.new_empty(B, K, d), b.new_empty(B, K)


@torch.library.custom_op("safeflow::safeflow_loop", mutates_args=(), device_types=_DEVICES)
def safeflow_loop(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                  P: torch.Tensor | None, lr: float, lambda_safe: float, lambda_unsafe: float, margin: float,
                  max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The SafeFlow loop (:func:`safeflow.kernels.safeflow_loop`): new rows [M, d] and steps taken [M] int64."""
    return IMPLS[h.device.type].safeflow_loop(h, W, b, Phi, xi, P, lr=lr, lambda_safe=lambda_safe,
                                              lambda_unsafe=lambda_unsafe, margin=margin, max_steps=max_steps)


@safeflow_loop.register_fake
def _(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor, P: torch.Tensor | None,
      lr: float, lambda_safe: float, lambda_unsafe: float, margin: float,
      max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    return h.new_empty(h.shape), h.new_empty(h.shape[0], dtype=torch.int64)


@torch.library.custom_op("safeflow::project", mutates_args=(), device_types="cpu")
def project(h0: torch.Tensor, A: torch.Tensor, c: torch.Tensor, margin: torch.Tensor,
            M: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 projections (:func:`safeflow.kernels.project`): h* [B, d], λ* [B, K] and status [B] int64."""
    return IMPLS["cpu"].project(h0, A, c, margin, M)


@project.register_fake
def _(h0: torch.Tensor, A: torch.Tensor, c: torch.Tensor, margin: torch.Tensor,
      M: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, K, d = A.shape
    f64 = torch.float64
    return h0.new_empty(B, d, dtype=f64), h0.new_empty(B, K, dtype=f64), h0.new_empty(B, dtype=torch.int64)


@torch.library.custom_op("safeflow::projection_steer", mutates_args=(), device_types="cpu")
def projection_steer(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                     M: torch.Tensor | None, WM: torch.Tensor | None, margin: float, max_rounds: int, ramp_rounds: int,
                     bisections: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projection steerer's rounds (:func:`safeflow.kernels.projection_steer`): new rows [n, d],
    rounds [n] and the status of each row's last projection [n] (int64); each round's step is shortened
    by ``bisections`` halvings (to 2^-bisections). ``WM``: the rows of W M [F, d] or None."""
    return IMPLS["cpu"].projection_steer(h, W, b, Phi, xi, M, WM, margin=margin, max_rounds=max_rounds,
                                         ramp_rounds=ramp_rounds, bisections=bisections)


@projection_steer.register_fake
def _(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor, M: torch.Tensor | None,
      WM: torch.Tensor | None, margin: float, max_rounds: int, ramp_rounds: int,
      bisections: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = h.shape[0]
    return h.new_empty(h.shape), h.new_empty(n, dtype=torch.int64), h.new_empty(n, dtype=torch.int64)
