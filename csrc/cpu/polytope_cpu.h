// Fused facet-violation kernels for the CPU, on raw row-major buffers (no torch headers).
//
// Shapes: H [B, d] states, W [F, d] feature weights, b [F] biases, Phi [K, F] facets, PhiT [F, K]
// the same facets transposed (the caller keeps a cached copy), xi [K] thresholds.
// Pre-activations p = H Wᵀ + b are computed in tiles of 64 features and never stored whole:
//   V = ReLU(p) Φᵀ − ξ                          [B, K]
//   mask[b, c] bit j = p[b, 64c + j] is not <= 0  [B, ceil(F/64)] uint64 (NaN counts as active)
// Every other operation reads the activation pattern D from that mask.
#pragma once

#include <cstdint>

#include "../common.h"

namespace safeflow {

struct bf16 {
    uint16_t bits;
};

constexpr int64_t kTile = safeflow_common::kTileFeatures;  // features per mask word and per tile

inline int64_t mask_words(int64_t F) { return (F + kTile - 1) / kTile; }

// feat (optional, [B, F]) receives the features ReLU(H Wᵀ + b) for a backward that needs ∂Φ
// without recomputing them (the caller decides whether the batch is small enough to keep them).
template <typename T, typename WT>
void forward(const T* H, const WT* W, const T* b, const T* PhiT, const T* xi, T* V, uint64_t* mask, T* feat,
             int64_t B, int64_t d, int64_t F, int64_t K, int threads);

// gH = ((C Φ) ⊙ D) W  [B, d], touching only the rows of W whose feature is active. Rows whose
// violations V (optional) hold a NaN get NaN gradients.
template <typename T, typename WT>
void vjp_input(const WT* W, const T* PhiT, const uint64_t* mask, const T* C, const T* V, T* gH, int64_t B, int64_t d,
               int64_t F, int64_t K, int threads);

// Parameter gradients for weights C = ∂L/∂V [B, K]: any of gW [F, d], gb [F], gPhiT [F, K] may be null.
// ∂Φ reads the features from feat when given, else recomputes the active ones.
template <typename T>
void param_grads(const T* H, const T* W, const T* b, const T* PhiT, const uint64_t* mask, const T* feat, const T* C,
                 T* gW, T* gb, T* gPhiT, int64_t B, int64_t d, int64_t F, int64_t K, int threads);

// A = Φ D W [B, K, d] and c = ξ − Φ D b [B, K].
template <typename T, typename WT>
void jacobian(const WT* W, const T* b, const T* PhiT, const T* xi, const uint64_t* mask, T* A, T* c, int64_t B,
              int64_t d, int64_t F, int64_t K, int threads);

struct LoopConfig {
    double lr, lambda_safe, lambda_unsafe, margin;
    int64_t max_steps;
};

// What the SafeFlow loop uses to skip features proven inactive: the row norms ‖W_j‖ [F] and an
// optional basis U (`basis` [r, d], rows of unit norm) of the directions the steps mostly take,
// with basis_WT = U Wᵀ [r, F]; r = 0 for none. Any basis gives the same result; a good one skips more.
template <typename T>
struct LoopBound {
    const T* wnorm;
    const T* basis;
    const T* basis_WT;
    int64_t rank;
};

// SafeFlow (see safeflow/steerers/safeflow.py): x [M, d] starts as a copy of h and takes up to
// max_steps steps x ← x − lr·(∇L) P, stopping a row once every v_k <= −margin or V is not finite.
template <typename T, typename WT>
void safeflow_loop(const T* h, const WT* W, const T* b, const T* PhiT, const T* xi, const T* P, LoopBound<T> bound,
                   T* x, int64_t* steps, int64_t M, int64_t d, int64_t F, int64_t K, LoopConfig cfg, int threads);

}  // namespace safeflow
