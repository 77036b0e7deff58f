"""Calls into the compiled kernels on torch tensors.

The compiled modules see only addresses, shapes and a CPU thread count or a CUDA stream
(``torch.cuda.current_stream().cuda_stream``); this module makes every buffer contiguous,
checks shapes (:func:`safeflow.checks.kernel_operands`), dtypes and devices, allocates the outputs
and keeps Φᵀ (and bfloat16 copies of W) cached per parameter version. The ``torch.library`` custom
operators over these calls (and their autograd) are in :mod:`safeflow.kernels.ops`.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from .. import checks
from ..errors import ConfigError, DataError
from . import backends

_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
#: below this many multiply-adds a CPU call runs on one thread (starting threads costs more)
_MIN_PARALLEL_WORK = 1 << 22

_cache: dict[tuple[Any, ...], tuple[tuple[weakref.ref, ...], Any]] = {}
#: dimension of the step basis that the CPU SafeFlow loop bounds pre-activation changes with
#: (``LoopBound`` in ``csrc/cpu``): at most this, and at most d / 4
STEP_BASIS_RANK = 64


def clear_cache() -> None:
    """Forget cached derived copies (Φᵀ, low-precision W) of parameters."""
    _cache.clear()


def derived(t: torch.Tensor | tuple[torch.Tensor, ...], kind: str, make: Any, *, always: bool = False) -> Any:
    """``make(t)``, cached while ``t`` (a tensor, or a tuple of tensors) is the same at the same version.

    Cached only when every tensor is a parameter, or with ``always``: a parameter's in-place updates
    bump its version, while other tensors may be changed through ``.data`` unseen (as gradcheck
    does), and inference tensors (made under ``torch.inference_mode``, as in vLLM) have no version
    at all. ``always`` is for tensors that only change through in-place operations (a buffer
    updated by ``copy_``), or where a stale result stays correct. An entry goes once its tensors are freed.
    """
    ts = t if isinstance(t, tuple) else (t,)
    inference = any(u.is_inference() for u in ts)  # no version counter: cached only with ``always``
    if not always and (inference or not all(isinstance(u, nn.Parameter) for u in ts)):
        return make(t)
    key = (tuple(id(u) for u in ts), kind, tuple((u.data_ptr(), None if u.is_inference() else u._version, u.dtype,
                                                  u.device, tuple(u.shape)) for u in ts))
    hit = _cache.get(key)
    if hit is not None and all(ref() is u for ref, u in zip(hit[0], ts)):
        return hit[1]
    for k in [k for k, (refs, _) in _cache.items()
              if (k[0] == key[0] and k[1] == kind) or any(ref() is None for ref in refs)]:
        del _cache[k]  # older versions, and what was derived from tensors that no longer exist
    out = make(t)
    _cache[key] = (tuple(weakref.ref(u) for u in ts), out)
    return out


def _transposed(Phi: torch.Tensor) -> torch.Tensor:
    return derived(Phi, "T", lambda p: p.detach().t().contiguous())


def leading_subspace(P: torch.Tensor, rank: int) -> torch.Tensor:
    """An orthonormal basis [rank, d] (float64 rows) of the leading eigenvectors of a symmetric P [d, d]:
    randomized subspace iteration (fixed seed, three passes) and a Rayleigh–Ritz step."""
    P = P.double()
    g = torch.Generator(device=P.device).manual_seed(0)
    Q = torch.randn(P.shape[0], min(P.shape[0], rank + 8), generator=g, dtype=torch.float64, device=P.device)
    for _ in range(3):
        Q = torch.linalg.qr(P @ Q).Q
    _, vecs = torch.linalg.eigh(Q.T @ P @ Q)
    return (Q @ vecs[:, -rank:]).T.contiguous()


def _loop_bound(W: torch.Tensor, P: torch.Tensor | None, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What the CPU SafeFlow loop skips inactive features with, in the states' dtype: the row norms
    ‖W_j‖ [F] and, with a preconditioner P, a basis U [r, d] of P's leading subspace (the steps
    x ← x − lr·g P mostly move along it) and U Wᵀ [r, F] (products in float64 from U as passed)."""
    wnorm = derived(W, f"row norms {dtype}", lambda w: w.detach().double().norm(dim=1).to(dtype))
    rank = min(STEP_BASIS_RANK, W.shape[1] // 4)
    if P is None or rank == 0:
        return wnorm, None, None
    # any basis gives the exact result (a stale one only skips fewer features): cached on P always
    basis = derived(P, f"leading subspace {rank} {dtype}", lambda p: leading_subspace(p.detach(), rank).to(dtype),
                    always=True)
    basis_WT = derived((W, basis), "basis times W transposed",
                       lambda wu: (wu[1].double() @ wu[0].detach().double().T).to(dtype),
                       always=isinstance(W, nn.Parameter))
    return wnorm, basis, basis_WT


def _mask(mask: torch.Tensor, B: int, F: int, device: torch.device) -> torch.Tensor:
    """The activation bitmask of a forward over B rows and F features (int64 [B, ceil(F/64)] on
    ``device``), contiguous; :class:`DataError` otherwise."""
    checks.check_shape("mask", checks.check_tensor("mask", mask), (B, -(-F // 64)), "[B, ceil(F/64)]",
                       "pass the bitmask of the same forward")
    if mask.dtype != torch.int64:
        raise DataError(f"mask is {mask.dtype}; pass the int64 bitmask of the same forward")
    checks.check_device("mask", mask, device, "the states")
    return mask.contiguous()


def _features(feat: torch.Tensor, H: torch.Tensor, F: int) -> torch.Tensor:
    """The features [B, F] of a forward over H [B, d], in H's dtype and on its device, contiguous."""
    checks.check_shape("feat", checks.check_tensor("feat", feat), (H.shape[0], F), "[B, F]",
                       "pass the features of the same forward")
    if feat.dtype != H.dtype:
        raise DataError(f"feat is {feat.dtype} but the states are {H.dtype}; pass the features of the same forward")
    checks.check_device("feat", feat, H.device, "the states")
    return feat.contiguous()


class Compiled:
    """One compiled backend (``"cpu"`` or ``"cuda"``) called on tensors."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def mod(self) -> Any:
        mod = backends.module(self.name)
        if mod is None:
            raise RuntimeError(f"the compiled kernel backend {self.name!r} is not loaded")
        return mod

    def _call(self, op: str, device: torch.device, sizes: tuple[int, int, int, int], dtype: torch.dtype, work: int,
              *args: Any) -> None:
        """``mod.<op>(*args, workspace, tail)``: tail is a thread count (CPU) or the current stream (CUDA).
        An empty batch (sizes[0] == 0) has nothing to compute except zero parameter gradients."""
        if sizes[0] == 0 and op != "param_grads":
            return
        nbytes = self.mod.workspace_bytes(op, _CODES[dtype], *sizes)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
        try:
            if self.name == "cpu":
                threads = 1 if work < _MIN_PARALLEL_WORK else torch.get_num_threads()
                getattr(self.mod, op)(*args, 0, threads)
                return
            with torch.cuda.device(device):
                getattr(self.mod, op)(*args, ws.data_ptr() if ws is not None else 0,
                                      torch.cuda.current_stream(device).cuda_stream)
        except ValueError as exc:  # the bindings' own argument checks (std::invalid_argument)
            raise DataError(f"kernel backend {self.name!r} refused {op}: {exc}; check the operands' shapes "
                            "(H [B, d], W [F, d], b [F], Phi [K, F], xi [K])") from None

    def _check(self, H: torch.Tensor, W: torch.Tensor, *params: torch.Tensor) -> tuple[int, int]:
        """Validate dtypes and devices; returns the (state, weight) type codes."""
        for name, t in zip(("H", "W", "b", "Phi", "xi", "P"), (H, W, *params)):
            if t.device.type != self.name:
                raise DataError(f"{name} is on {t.device} but kernel backend {self.name!r} runs on {self.name}; "
                                f"move every tensor to one device or use backend='auto'")
        dtype = H.dtype
        for name, t in zip(("b", "Phi", "xi", "P"), params):
            if t.dtype != dtype:
                raise DataError(f"{name} is {t.dtype} but the states are {dtype}; convert the states to the "
                                f"constraint set's dtype (e.g. H.to({t.dtype}))")
        allowed = {torch.float32, torch.float64} | ({torch.float16, torch.bfloat16} if self.name == "cuda" else set())
        if dtype not in allowed:
            raise DataError(f"kernel backend {self.name!r} takes {sorted(map(str, allowed))} states, got {dtype}; "
                            "convert them with .float()")
        if W.dtype != dtype and not (W.dtype == torch.bfloat16 and dtype == torch.float32):
            raise DataError(f"W is {W.dtype} but the states are {dtype}; convert W with W.to({dtype}) (W may differ "
                            "only as bfloat16 storage with float32 states)")
        return _CODES[dtype], _CODES[W.dtype]

    def forward(self, H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                mask: bool = True,
                features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """V [B, K], (if ``mask``) the activation bitmask [B, ceil(F/64)] int64 and (if ``features``,
        CPU only) the features ReLU(H Wᵀ + b) [B, F]; None for what was not asked."""
        checks.kernel_operands(H, W, b, Phi, xi)
        codes = self._check(H, W, b, Phi, xi)
        H, W, b, xi = H.contiguous(), W.contiguous(), b.contiguous(), xi.contiguous()
        PhiT = _transposed(Phi)
        (B, d), (K, F) = H.shape, Phi.shape
        V = torch.empty(B, K, dtype=H.dtype, device=H.device)
        M = torch.empty(B, -(-F // 64), dtype=torch.int64, device=H.device) if mask or self.name == "cuda" else None
        feat = torch.empty(B, F, dtype=H.dtype, device=H.device) if features else None
        self._call("forward", H.device, (B, d, F, K), H.dtype, B * F * d, *codes, H.data_ptr(), W.data_ptr(),
                   b.data_ptr(), PhiT.data_ptr(), xi.data_ptr(), V.data_ptr(), M.data_ptr() if M is not None else 0,
                   feat.data_ptr() if feat is not None else 0, B, d, F, K)
        return V, (M if mask else None), feat

    def vjp_input(self, W: torch.Tensor, Phi: torch.Tensor, mask: torch.Tensor, C: torch.Tensor,
                  V: torch.Tensor | None = None) -> torch.Tensor:
        """((C Φ) ⊙ D) W [B, d]; rows whose V holds a NaN come back NaN."""
        codes = self._check(C, W, Phi)
        (B, K), (F, d) = C.shape, W.shape
        mask = _mask(mask, B, F, C.device)
        checks.check_shape("Phi", Phi, (K, F), "[K, F]", "weights C [B, K] need Phi with K rows and F = W's rows")
        if V is not None:
            checks.check_shape("V", V, (B, K), "[B, K]", "pass the violations of the same forward")
            if V.dtype != C.dtype or V.device != C.device:
                raise DataError(f"V is {V.dtype} on {V.device} but the weights are {C.dtype} on {C.device}; pass the "
                                "violations of the same forward")
        C, W = C.contiguous(), W.contiguous()
        PhiT = _transposed(Phi)
        gH = torch.empty(B, d, dtype=C.dtype, device=C.device)
        self._call("vjp_input", C.device, (B, d, F, K), C.dtype, B * F * d // 8, *codes, W.data_ptr(),
                   PhiT.data_ptr(), mask.data_ptr(), C.data_ptr(), V.contiguous().data_ptr() if V is not None else 0,
                   gH.data_ptr(), B, d, F, K)
        return gH

    def param_grads(self, H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, mask: torch.Tensor,
                    C: torch.Tensor, need: tuple[bool, bool, bool],
                    feat: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
        """∂W [F, d], ∂b [F], ∂Φᵀ [F, K] (transposed) for weights C = ∂L/∂V (None where ``need`` is False);
        ``feat``: the forward's features if it kept them."""
        self._check(H, W, b, Phi, C)
        if W.dtype != H.dtype:
            raise DataError("parameter gradients need W in the states' dtype; train without bfloat16 weight storage")
        B, d, F, K = checks.kernel_operands(H, W, b, Phi, Phi[:, 0], C=C)  # Phi[:, 0]: a [K] stand-in for xi
        mask = _mask(mask, B, F, H.device)
        feat = _features(feat, H, F) if feat is not None else None
        H, W, b, C = H.contiguous(), W.contiguous(), b.contiguous(), C.contiguous()
        PhiT = _transposed(Phi)
        new = lambda *shape: torch.empty(*shape, dtype=H.dtype, device=H.device)  # noqa: E731
        gW, gb, gPhiT = (new(F, d) if need[0] else None), (new(F) if need[1] else None), (new(F, K) if need[2] else None)
        ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
        self._call("param_grads", H.device, (B, d, F, K), H.dtype, B * F * d, _CODES[H.dtype], H.data_ptr(),
                   W.data_ptr(), b.data_ptr(), PhiT.data_ptr(), mask.data_ptr(), ptr(feat), C.data_ptr(), ptr(gW),
                   ptr(gb), ptr(gPhiT), B, d, F, K)
        return gW, gb, gPhiT

    def jacobian(self, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A = Φ D W [B, K, d] and c = ξ − Φ D b [B, K]."""
        codes = self._check(b, W, b, Phi, xi)
        B, (F, d), K = mask.shape[0], W.shape, Phi.shape[0]
        checks.kernel_operands(W[:0], W, b, Phi, xi)  # W[:0]: a [0, d] stand-in for H
        mask = _mask(mask, B, F, b.device)
        W, b, xi = W.contiguous(), b.contiguous(), xi.contiguous()
        PhiT = _transposed(Phi)
        A = torch.empty(B, K, d, dtype=b.dtype, device=b.device)
        c = torch.empty(B, K, dtype=b.dtype, device=b.device)
        self._call("jacobian", b.device, (B, d, F, K), b.dtype, B * K * d * 64, *codes, W.data_ptr(), b.data_ptr(),
                   PhiT.data_ptr(), xi.data_ptr(), mask.data_ptr(), A.data_ptr(), c.data_ptr(), B, d, F, K)
        return A, c

    def safeflow_loop(self, h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor, xi: torch.Tensor,
                      P: torch.Tensor | None, *, lr: float, lambda_safe: float, lambda_unsafe: float, margin: float,
                      max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The SafeFlow loop from rows h [M, d]: new rows [M, d] and steps taken [M] (long)."""
        checks.kernel_operands(h, W, b, Phi, xi, P=P, states="h")
        codes = self._check(h, W, b, Phi, xi, *([] if P is None else [P]))
        h, W, b, xi = h.contiguous(), W.contiguous(), b.contiguous(), xi.contiguous()
        P = P.contiguous() if P is not None else None
        PhiT = _transposed(Phi)
        (M, d), (K, F) = h.shape, Phi.shape
        x = torch.empty_like(h)
        steps = torch.empty(M, dtype=torch.int64, device=h.device)
        wnorm, basis, basis_WT = _loop_bound(W, P, h.dtype) if self.name == "cpu" else (None, None, None)
        self._call("safeflow_loop", h.device, (M, d, F, K), h.dtype, M * F * d * max_steps, *codes, h.data_ptr(),
                   W.data_ptr(), b.data_ptr(), PhiT.data_ptr(), xi.data_ptr(), P.data_ptr() if P is not None else 0,
                   *(t.data_ptr() if t is not None else 0 for t in (wnorm, basis, basis_WT)),
                   basis.shape[0] if basis is not None else 0, x.data_ptr(), steps.data_ptr(), M, d, F, K, float(lr),
                   float(lambda_safe), float(lambda_unsafe), float(margin), int(max_steps))
        return x, steps

    def _cpu_only(self, op: str) -> None:
        if self.name != "cpu":
            raise ConfigError(f"{op} is compiled for the CPU only; run it on CPU tensors (backend 'cpu'), or use the "
                              "eager path (backend 'torch')")

    def project(self, h0: torch.Tensor, A: torch.Tensor, c: torch.Tensor, margin: torch.Tensor,
                M: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 projections of h0 [B, d] onto ``{A h <= c − margin}`` (A [B, K, d], c and margin [B, K]) in
        the metric M [d, d] (None: identity): h* [B, d] (h0 where status != OK), λ [B, K] and status [B] long."""
        self._cpu_only("project")
        checks.check_shape("A", checks.check_float("A", checks.check_tensor("A", A)), (None, None, None), "[B, K, d]",
                           "pass one constraint matrix per row")
        B, K, d = A.shape
        for name, t, shape, layout in (("h0", h0, (B, d), "[B, d]"), ("c", c, (B, K), "[B, K]"),
                                       ("margin", margin, (B, K), "[B, K]"), ("M", M, (d, d), "[d, d]")):
            if t is not None:
                checks.check_shape(name, checks.check_float(name, checks.check_tensor(name, t)), shape, layout,
                                   "A [B, K, d], h0 [B, d], c and margin [B, K], M [d, d] must agree in B, K and d")
                checks.check_device(name, t, A.device, "A")
        h0, A, c, margin = (t.to(torch.float64).contiguous() for t in (h0, A, c, margin))
        M = M.to(torch.float64).contiguous() if M is not None else None
        h = torch.empty(B, d, dtype=torch.float64)
        lam = torch.empty(B, K, dtype=torch.float64)
        status = torch.empty(B, dtype=torch.int64)
        self._call("project", h0.device, (B, d, 0, K), torch.float64, B * K * K * d, h0.data_ptr(), A.data_ptr(),
                   c.data_ptr(), margin.data_ptr(), M.data_ptr() if M is not None else 0, h.data_ptr(),
                   lam.data_ptr(), status.data_ptr(), B, d, K)
        return h, lam, status

    def projection_steer(self, h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor,
                         xi: torch.Tensor, M: torch.Tensor | None, WM: torch.Tensor | None = None, *, margin: float,
                         max_rounds: int, ramp_rounds: int,
                         bisections: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projection steerer's rounds from rows h [n, d]: new rows [n, d] (NaN where the first round
        failed), rounds [n] long and the status of each row's last projection [n] long. ``WM`` [F, d]:
        the rows of W M in h's dtype, or None (then each round multiplies A by M)."""
        self._cpu_only("projection_steer")
        d = checks.kernel_operands(h, W, b, Phi, xi, states="h")[1]
        if M is not None:
            checks.check_shape("M", checks.check_float("M", checks.check_tensor("M", M)), (d, d), "[d, d]",
                               "the metric is a square matrix over the hidden dimensions")
            checks.check_device("M", M, h.device, "h")
        if WM is not None:
            if M is None:
                raise ConfigError("WM (the rows of W M) is given without the metric M; pass both or neither")
            checks.check_shape("WM", checks.check_tensor("WM", WM), tuple(W.shape), "[F, d]",
                               "pass the rows of W M (metric_rows(W, M))")
            checks.check_device("WM", WM, h.device, "h")
            if WM.dtype != h.dtype:
                raise DataError(f"WM is {WM.dtype} but the states are {h.dtype}; pass WM.to({h.dtype})")
            WM = WM.contiguous()
        codes = self._check(h, W, b, Phi, xi)
        h, W, b, xi = h.contiguous(), W.contiguous(), b.contiguous(), xi.contiguous()
        M = M.to(torch.float64).contiguous() if M is not None else None
        PhiT = _transposed(Phi)
        wnorm = derived(W, "row_norms", lambda w: w.detach().double().norm(dim=1))
        (n, d), (K, F) = h.shape, Phi.shape
        out = torch.empty_like(h)
        rounds = torch.empty(n, dtype=torch.int64)
        status = torch.empty(n, dtype=torch.int64)
        self._call("projection_steer", h.device, (n, d, F, K), h.dtype, n * F * d * max_rounds, *codes, h.data_ptr(),
                   W.data_ptr(), b.data_ptr(), PhiT.data_ptr(), xi.data_ptr(), M.data_ptr() if M is not None else 0,
                   WM.data_ptr() if WM is not None else 0, wnorm.data_ptr(), out.data_ptr(), rounds.data_ptr(),
                   status.data_ptr(), n, d, F, K, float(margin), int(max_rounds), int(ramp_rounds), int(bisections))
        return out, rounds, status


class ViolationsFunction:
    """Deprecated: ``ViolationsFunction.apply(impl, H, W, b, Phi, xi)`` is now
    :func:`safeflow.kernels.violations` (``backend=impl.name``), the custom operator
    ``safeflow::violations_forward`` with its registered autograd (:mod:`safeflow.kernels.ops`)."""

    @staticmethod
    def apply(impl: Compiled, H: torch.Tensor, W: torch.Tensor, b: torch.Tensor, Phi: torch.Tensor,
              xi: torch.Tensor) -> torch.Tensor:
        """V = ReLU(H Wᵀ + b) Φᵀ − ξ [B, K] on ``impl``'s device, differentiable in every argument."""
        warnings.warn("safeflow.kernels.compiled.ViolationsFunction is deprecated; call safeflow.kernels.violations("
                      f"H, W, b, Phi, xi, backend={impl.name!r}) (the custom operator "
                      "safeflow::violations_forward, registered by safeflow.kernels.ops)", DeprecationWarning,
                      stacklevel=2)
        return torch.ops.safeflow.violations_forward(H, W, b, Phi, xi, False)[0]


IMPLS = {"cpu": Compiled("cpu"), "cuda": Compiled("cuda")}
