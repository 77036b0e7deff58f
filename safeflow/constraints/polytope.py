"""The safety polytope of Chen, As & Krause (ICML 2025).

Features ``f(h) = ReLU(W h + b)`` (W [F, d], b [F]), facets ``Φ`` [K, F] and thresholds ``ξ`` [K].
Violation of facet k: ``v_k(h) = Φ_k · f(h) − ξ_k``. **Unsafe (label 1) iff any v_k > 0.**
The safe set ``{h : v(h) <= 0}`` is a polytope in feature space.

Training loss per batch (margin κ, unsafe weight w_u):

* safe rows: ``Σ_k ReLU(κ + v_k)`` — every facet satisfied with margin;
* unsafe rows: ``w_u · ReLU(κ − v_{a(i)})`` — the row's assigned facet violated with margin.
  ``a(i)`` starts as ``argmax_k v_k``; while the entropy of the assignment histogram is below
  ``entropy_weight · ½ log₂ K`` rows are moved from the most crowded facet to less used ones
  (cheapest move first), spreading unsafe rows over facets. Assignment carries no gradient;
* ``+ λ_f · mean_i ‖f(h_i)‖₁ + λ_Φ · mean_k ‖Φ_k‖₁``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import kernels
from ..checks import check_positive_int
from ..errors import ConfigError
from ..features import FeatureDataset, Moments
from ..presets import REFERENCE_BATCH
from .base import ConstraintSet, Weights
from .training import default_epochs, entropy_bits, fold_standardization, one_of, train_minibatches

#: Default margin κ. The paper's per-model margins (Llama-2-7B 60, Ministral-8B 5, Qwen2-1.5B 30)
#: and ours for the default model are in :attr:`PolytopeConstraints.preset_settings`. Inputs are
#: standardised during training, so κ is on a comparable scale across models.
DEFAULT_MARGIN = 5.0


@dataclass(frozen=True)
class PolytopeSettings:
    """The polytope's settings in a model preset (:mod:`safeflow.presets`): its shape (constructor
    arguments) and training settings (fit options; the loss is averaged per example and acts on
    standardised hidden states, so the values carry over between models)."""

    num_facets: int  #: K
    num_features: int  #: F, the width of the feature map
    margin: float  #: κ, on standardised inputs
    feature_l1: float  #: λ_f per example
    facet_l1: float  #: λ_Φ per example
    unsafe_weight: float  #: w_u
    schedule: str  #: learning-rate schedule
    average: float  #: fraction of final training steps whose parameters are averaged


def _paper_settings(margin: float, num_facets: int, unsafe_weight: float) -> PolytopeSettings:
    """A paper preset's polytope: F = 16384 and the reference code's λ_f = 1 and λ_Φ = 1e-4,
    rescaled to per-example (divided by :data:`~safeflow.presets.REFERENCE_BATCH`); constant
    learning rate, no averaging."""
    return PolytopeSettings(num_facets=num_facets, num_features=16384, margin=margin, feature_l1=1.0 / REFERENCE_BATCH,
                            facet_l1=1e-4 / REFERENCE_BATCH, unsafe_weight=unsafe_weight, schedule="constant",
                            average=0.0)


ASSIGNMENTS = ("greedy", "reference")
INITS = ("default", "reference")


def assign_facets(v: torch.Tensor, entropy_weight: float = 1.0, rule: str = "greedy",
                  generator: torch.Generator | None = None, max_attempts: int = 100) -> torch.Tensor:
    """Entropy-driven assignment of unsafe rows to facets.

    Args:
        v: violations [M, K] of the unsafe rows (no gradient needed).
        entropy_weight: scales the target entropy ``½ log₂ K``; 0 disables re-assignment.
        rule: how rows are moved while the entropy (bits) of the assignment histogram is below
            the target. A row may only move to a facet it violates (``v > 0``), or to its
            second-most-violated facet if it violates at most one.

            * ``"greedy"`` (default): move the row of the most crowded facet whose violation drops
              least, to a facet with fewer rows; deterministic.
            * ``"reference"``: the paper's code — up to ``max_attempts`` random proposals (a random
              unsafe row, a random allowed facet), each kept only if it raises the entropy.
        generator: random source of the ``"reference"`` rule.

    Returns:
        a [M] long: the facet each unsafe row must violate, starting from ``argmax_k v``.
    """
    if rule not in ASSIGNMENTS:
        raise ConfigError(f"assignment must be one of {ASSIGNMENTS}, got {rule!r}")
    M, K = v.shape
    a = v.argmax(dim=1)
    target = entropy_weight * 0.5 * math.log2(K) if K > 1 else 0.0
    counts = torch.bincount(a, minlength=K)
    if K == 1 or entropy_bits(counts) >= target:
        return a
    second = v.topk(2, dim=1).indices[:, 1]
    allowed = (v > 0) | (torch.arange(K, device=v.device) == second[:, None])
    allowed[torch.arange(M), a] = False
    if rule == "reference":
        entropy = entropy_bits(counts)
        for _ in range(max_attempts):
            row = int(torch.randint(M, (1,), generator=generator))
            choices = allowed[row].nonzero().squeeze(1)
            if entropy >= target or choices.numel() == 0:
                if entropy >= target:
                    break
                continue
            facet = int(choices[torch.randint(choices.numel(), (1,), generator=generator)])
            counts[a[row]] -= 1
            counts[facet] += 1
            new = entropy_bits(counts)
            if new > entropy:
                allowed[row, facet], allowed[row, a[row]] = False, bool(v[row, a[row]] > 0)
                a[row], entropy = facet, new
            else:
                counts[facet] -= 1
                counts[a[row]] += 1
        return a
    for _ in range(M):
        if entropy_bits(counts) >= target:
            break
        k_max = int(counts.argmax())
        rows = (a == k_max).nonzero().squeeze(1)
        ok = allowed[rows] & (counts < counts[k_max] - 1)
        if not ok.any():
            break
        cost = v[rows, k_max].unsqueeze(1) - v[rows]  # loss of violation when moving row -> facet
        cost = cost.masked_fill(~ok, float("inf"))
        flat = int(cost.argmin())
        row, facet = int(rows[flat // K]), flat % K
        allowed[row, facet] = False
        a[row] = facet
        counts[k_max] -= 1
        counts[facet] += 1
    return a


class PolytopeConstraints(ConstraintSet, name="polytope"):
    """Safety polytope over a ReLU feature map (see module docstring for the math).

    Args:
        input_dim: hidden size d.
        num_facets: number of facets K.
        num_features: the width F of the feature map (paper: 16384).
        backend: kernel backend for violations, their gradients, ``local_affine`` and training
            (:mod:`safeflow.kernels`: ``"auto"``, ``"cpu"``, ``"cuda"`` or the eager ``"torch"``);
            a runtime choice, not saved. Settable later as ``poly.backend``.
        weight_dtype: ``torch.bfloat16`` stores a cached bfloat16 copy of W for gradient-free calls
            of the compiled backends (float32 accumulation); None keeps W's own dtype.
    """

    fit_option_rules = {"assignment": one_of(ASSIGNMENTS), "init": one_of(INITS)}
    facet_analysis = True
    settings_type = PolytopeSettings
    #: The paper's reference configurations (margin κ, facets K, unsafe weight w_u) and the default
    #: model's (chosen on the out-of-distribution validation source; see the docs' concepts page).
    preset_settings = {
        "llama-2-7b": _paper_settings(margin=60.0, num_facets=50, unsafe_weight=2.0),
        "ministral-8b": _paper_settings(margin=5.0, num_facets=30, unsafe_weight=3.0),
        "qwen2-1.5b": _paper_settings(margin=30.0, num_facets=50, unsafe_weight=5.0),
        "smollm2-135m-instruct": PolytopeSettings(num_facets=14, num_features=4096, margin=20.0, feature_l1=0.01,
                                                  facet_l1=1e-3, unsafe_weight=3.0, schedule="cosine", average=0.5),
    }

    def __init__(self, input_dim: int, num_facets: int = 14, num_features: int = 16384, *, backend: str = "auto",
                 weight_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_dim)
        check_positive_int("num_facets", num_facets)
        check_positive_int("num_features", num_features)
        self.num_constraints, self.num_features = num_facets, num_features
        self.feature_map = nn.Linear(input_dim, num_features)
        self.facets = nn.Parameter(torch.randn(num_facets, num_features) / math.sqrt(num_features))
        self.thresholds = nn.Parameter(torch.zeros(num_facets))
        self.backend, self.weight_dtype = kernels.check_name(backend), weight_dtype

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "num_facets": self.num_constraints, "num_features": self.num_features}

    def features(self, H: torch.Tensor) -> torch.Tensor:
        """f(H) = ReLU(H Wᵀ + b), [N, F]."""
        return F.relu(self.feature_map(H))

    def violations(self, H: torch.Tensor) -> torch.Tensor:
        """V = f(H) Φᵀ − ξ, [N, K], for H [N, d] in the set's dtype and device (:class:`DataError`
        otherwise, and before ``fit``); rows with NaN give NaN violations."""
        H = self._inputs(H)
        name = kernels.resolve(self.backend, H.device, self.facets.dtype)
        return kernels.violations(H, *self._operands_for(name), backend=name)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W [F, d], b [F], Φ [K, F], ξ [K]) for :mod:`safeflow.kernels`; W as ``weight_dtype`` when set
        and no gradient is being recorded."""
        W = self.feature_map.weight
        if self.weight_dtype is not None and W.dtype != self.weight_dtype and not torch.is_grad_enabled():
            W = kernels.derived(W, str(self.weight_dtype), lambda w: w.detach().to(self.weight_dtype))
        return W, self.feature_map.bias, self.facets, self.thresholds

    def _operands_for(self, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, b, Φ, ξ) for the resolved kernel ``backend``: :meth:`kernel_operands` for a compiled one,
        the parameters themselves for ``"torch"`` (the eager backend computes in their dtype)."""
        if backend != "torch":
            return self.kernel_operands()
        return self.feature_map.weight, self.feature_map.bias, self.facets, self.thresholds

    def _loss_terms(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Violations [N, K] and feature L1 norms ‖f(z)‖₁ [N] for the training loss, both from one
        :func:`safeflow.kernels.violations` pass: the L1 norm of ReLU features is the violation of an
        extra all-ones facet with threshold 0."""
        name = kernels.resolve(self.backend, Z.device, self.facets.dtype)
        W, b, Phi, xi = self._operands_for(name)
        V = kernels.violations(Z, W, b, torch.cat([Phi, torch.ones_like(Phi[:1])]), torch.cat([xi, xi.new_zeros(1)]),
                               backend=name)
        return V[:, :-1], V[:, -1]

    def violations_vjp(self, H: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed form: inside the activation pattern D = [W h + b > 0], ∂v/∂h = Φ D W, so the
        product with weights c [N, K] is ``((c Φ) ⊙ D) W``. Same result as autograd, one pass; rows
        whose V holds a NaN get a NaN gradient (on every backend)."""
        H = self._inputs(H)
        name = kernels.resolve(self.backend, H.device, self.facets.dtype)
        with torch.no_grad():
            return kernels.violations_vjp(H, *self._operands_for(name), weights, backend=name)

    def local_affine(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed form: with D = diag(W h + b > 0), ``A = Φ D W`` [N, K, d] and
        ``c = ξ − Φ D b`` [N, K], so that ``v(h) = A h − c`` within the activation pattern of h.
        Rows whose V holds a NaN have no pattern: their A and c are NaN (on every backend)."""
        H = self._inputs(H)
        name = kernels.resolve(self.backend, H.device, self.facets.dtype)
        with torch.no_grad():
            return kernels.local_affine(H, *self._operands_for(name), backend=name)

    def _train(
        self,
        data: FeatureDataset,
        stats: Moments,
        *,
        progress: bool,
        margin: float = DEFAULT_MARGIN,
        unsafe_weight: float = 1.0,
        feature_l1: float = 1.0,
        facet_l1: float = 1e-3,
        entropy_weight: float = 1.0,
        assignment: str = "greedy",
        init: str = "default",
        epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-2,
        schedule: str = "constant",
        average: float = 0.0,
        seed: int = 0,
    ) -> list[float]:
        """The polytope's fit options (:meth:`~safeflow.constraints.ConstraintSet.fit` takes them by keyword).

        Hyper-parameters as in the paper (Adam, lr 1e-2, batch 128, λ_f = 1, entropy weight 1);
        ``margin`` is κ (per-model values in :attr:`preset_settings`), ``unsafe_weight`` w_u,
        ``feature_l1`` λ_f, ``facet_l1`` λ_Φ; ``entropy_weight`` and ``assignment`` drive
        :func:`assign_facets`; ``init`` is :meth:`reset_parameters`'s; ``epochs`` defaults to about
        600 steps; ``schedule`` and ``average`` as in :func:`~safeflow.constraints.training.train_minibatches`.
        """
        self.reset_parameters(init)
        assign_rng = torch.Generator().manual_seed(seed)
        mean, std = stats.standardization()
        kappa = float(margin)

        def loss_fn(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            v, f_l1 = self._loss_terms(z)
            unsafe = labels == 1
            hinge = F.relu(kappa + v[~unsafe]).sum()
            if unsafe.any():
                vu = v[unsafe]
                a = assign_facets(vu.detach(), entropy_weight, assignment, assign_rng)
                hinge = hinge + unsafe_weight * F.relu(kappa - vu.gather(1, a[:, None])).sum()
            reg = feature_l1 * f_l1.mean() + facet_l1 * self.facets.abs().sum(1).mean()
            return hinge / len(labels) + reg

        history = train_minibatches(
            self.parameters(), loss_fn, data, mean, std,
            epochs=epochs or default_epochs(len(data), batch_size), batch_size=batch_size, lr=lr, seed=seed,
            schedule=schedule, average=average, progress=progress, desc="polytope",
        )
        fold_standardization(self.feature_map.weight.data, self.feature_map.bias.data, mean, std)
        return history

    @torch.no_grad()
    def reset_parameters(self, init: str = "default") -> None:
        """``"default"``: PyTorch's Linear init, Φ ~ N(0, 1/F), ξ = 0. ``"reference"`` (the
        paper's code): Xavier-uniform W, b = 0, Φ ~ N(0, 1), ξ ~ N(0, 1)."""
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        kernels.clear_cache()  # fit later rewrites W through .data, which derived copies cannot see
        if init == "reference":
            nn.init.xavier_uniform_(self.feature_map.weight)
            self.feature_map.bias.zero_()
            self.facets.normal_(0, 1)
            self.thresholds.normal_(0, 1)
            return
        self.feature_map.reset_parameters()
        self.facets.normal_(0, 1 / math.sqrt(self.num_features))
        self.thresholds.zero_()
