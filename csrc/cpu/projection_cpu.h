// The projection steerer on the CPU in one call (see safeflow/steerers/projection.py for the math).
//
// Shapes: h [n, d] states outside the polytope, W [F, d], b [F], PhiT [F, K], xi [K] as in
// polytope_cpu.h; M [d, d] the float64 metric (null: identity); WM [F, d] the rows of W M in the
// states' dtype T, or null (with them, the rows of A M = Φ D (W M) cost K·|active|·d per round
// instead of K·d·d); wnorm [F] the float64 row norms ‖W_j‖₂.
//
// project():  for B problems, the dual of  min ½ (h − h₀)ᵀ M⁻¹ (h − h₀)  s.t.  A h <= c − m,
//     λ* = argmin_{λ >= 0} ½ λᵀ (A M Aᵀ + εI) λ − λᵀ (A h₀ − c + m),   h* = h₀ − M Aᵀ λ*,
//   by primal–dual active-set steps, then Lawson–Hanson (as safeflow/steerers/dual_qp.active_set),
//   all in float64, with the same status codes as safeflow.steerers.dual_qp.Status.
// projection_steer(): ProjectionSteerer._move with the native solver — rounds of linearisation,
//   projection, bisection on the violations along the segment, depth ramp, restoration and best-point
//   bookkeeping — in the states' dtype T (float32 or float64) with the dual in float64.
#pragma once

#include <cstdint>

namespace safeflow {

enum ProjectionStatus : int64_t { kOk = 0, kInfeasible = 1, kSolverFailed = 2, kNonfinite = 3 };

// h0 [B, d], A [B, K, d], c [B, K], margin [B, K], M [d, d] or null (all float64). Writes
// hout [B, d] (h* where status is OK, else h₀), lam [B, K] (0 where status is not OK), status [B].
void project(const double* h0, const double* A, const double* c, const double* margin, const double* M, double* hout,
             double* lam, int64_t* status, int64_t B, int64_t d, int64_t K, int threads);

struct SteerConfig {
    double margin;        // target depth m (violation units)
    int64_t max_rounds;   // projections per row at most
    int64_t ramp_rounds;  // the target depth ramps up over these rounds
    int64_t bisections;   // bisection steps on each segment
};

// out [n, d] the steered rows (NaN where the first round failed: the caller rejects the row),
// rounds [n] projections used, status [n] the status of the row's last projection.
template <typename T, typename WT>
void projection_steer(const T* h, const WT* W, const T* b, const T* PhiT, const T* xi, const double* M,
                      const T* WM, const double* wnorm, T* out, int64_t* rounds, int64_t* status, int64_t n,
                      int64_t d, int64_t F, int64_t K, SteerConfig cfg, int threads);

}  // namespace safeflow
