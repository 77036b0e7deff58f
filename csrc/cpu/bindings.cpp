// pybind11 bindings of the CPU kernels: every buffer is passed as an integer address of a
// contiguous row-major array (torch's data_ptr()); the Python side checks shapes and dtypes, and
// every binding checks its sizes and addresses again (../common/guards.h) before a kernel runs.
// Type codes: 0 = float32, 1 = float64, 2 = bfloat16 (weights W only, with float32 states).
// Every call ends with (workspace address, thread count); the CPU kernels need no workspace.
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "../common/guards.h"
#include "polytope_cpu.h"
#include "projection_cpu.h"

namespace py = pybind11;
using namespace safeflow;
using safeflow_guards::check_ptr;
using safeflow_guards::check_sizes;
using safeflow_guards::require;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

// Calls fn.template operator()<T, WT>() for the (state, weight) type pair.
template <typename Fn>
void dispatch(int dtype, int wdtype, Fn&& fn) {
    if (dtype == 0 && wdtype == 0) return fn(float{}, float{});
    if (dtype == 1 && wdtype == 1) return fn(double{}, double{});
    if (dtype == 0 && wdtype == 2) return fn(float{}, bf16{});
    throw std::invalid_argument("unsupported dtype pair (states, weights); use float32/float32, float64/float64 "
                                "or float32/bfloat16");
}

using Buffers = std::initializer_list<std::pair<uintptr_t, const char*>>;

// Sizes (../common/guards.h), a thread count >= 1, the addresses every call needs and, when there are
// rows (B > 0), the rows' buffers; std::invalid_argument otherwise.
void check_call(const char* op, int64_t B, int64_t d, int64_t F, int64_t K, int threads, Buffers always,
                Buffers rows) {
    check_sizes(op, B, d, F, K);
    require(threads >= 1, op, "the thread count must be >= 1, got " + std::to_string(threads));
    for (auto [p, name] : always) check_ptr(op, p, name);
    if (B > 0)
        for (auto [p, name] : rows) check_ptr(op, p, name);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "safeflow fused facet-violation kernels (CPU)";
    m.attr("TILE") = kTile;
    m.def("workspace_bytes", [](const std::string&, int, int64_t, int64_t, int64_t, int64_t) { return int64_t{0}; },
          "scratch bytes an operation needs (none on the CPU)");

    m.def(
        "forward",
        [](int dtype, int wdtype, uintptr_t H, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t xi, uintptr_t V,
           uintptr_t mask, uintptr_t feat, int64_t B, int64_t d, int64_t F, int64_t K, uintptr_t /*ws*/, int threads) {
            check_call("forward", B, d, F, K, threads, {{W, "W"}, {b, "b"}, {PhiT, "PhiT"}, {xi, "xi"}},
                       {{H, "H"}, {V, "V"}});
            py::gil_scoped_release release;
            dispatch(dtype, wdtype, [&](auto t, auto wt) {
                using T = decltype(t);
                using WT = decltype(wt);
                forward<T, WT>(ptr<const T>(H), ptr<const WT>(W), ptr<const T>(b), ptr<const T>(PhiT),
                               ptr<const T>(xi), ptr<T>(V), ptr<uint64_t>(mask), ptr<T>(feat), B, d, F, K, threads);
            });
        },
        "V = ReLU(H Wᵀ + b) Φᵀ − ξ [B, K], the activation bitmask [B, ceil(F/64)] and optionally the "
        "features [B, F] (mask, feat may be 0)");

    m.def(
        "vjp_input",
        [](int dtype, int wdtype, uintptr_t W, uintptr_t PhiT, uintptr_t mask, uintptr_t C, uintptr_t V, uintptr_t gH,
           int64_t B, int64_t d, int64_t F, int64_t K, uintptr_t /*ws*/, int threads) {
            check_call("vjp_input", B, d, F, K, threads, {{W, "W"}, {PhiT, "PhiT"}},
                       {{mask, "mask"}, {C, "C"}, {gH, "gH"}});
            py::gil_scoped_release release;
            dispatch(dtype, wdtype, [&](auto t, auto wt) {
                using T = decltype(t);
                using WT = decltype(wt);
                vjp_input<T, WT>(ptr<const WT>(W), ptr<const T>(PhiT), ptr<const uint64_t>(mask), ptr<const T>(C),
                                 ptr<const T>(V), ptr<T>(gH), B, d, F, K, threads);
            });
        },
        "gH = ((C Φ) ⊙ D) W [B, d] from the activation bitmask");

    m.def(
        "param_grads",
        [](int dtype, uintptr_t H, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t mask, uintptr_t feat, uintptr_t C,
           uintptr_t gW, uintptr_t gb, uintptr_t gPhiT, int64_t B, int64_t d, int64_t F, int64_t K, uintptr_t /*ws*/,
           int threads) {
            check_call("param_grads", B, d, F, K, threads, {{W, "W"}, {b, "b"}, {PhiT, "PhiT"}},
                       {{H, "H"}, {mask, "mask"}, {C, "C"}});
            py::gil_scoped_release release;
            dispatch(dtype, dtype, [&](auto t, auto) {
                using T = decltype(t);
                if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
                    param_grads<T>(ptr<const T>(H), ptr<const T>(W), ptr<const T>(b), ptr<const T>(PhiT),
                                   ptr<const uint64_t>(mask), ptr<const T>(feat), ptr<const T>(C), ptr<T>(gW),
                                   ptr<T>(gb), ptr<T>(gPhiT),
                                   B, d, F, K, threads);
            });
        },
        "∂W [F, d], ∂b [F], ∂Φᵀ [F, K] for weights C = ∂L/∂V (any output may be 0 to skip it; feat: the "
        "forward's features, or 0 to recompute the active ones)");

    m.def(
        "jacobian",
        [](int dtype, int wdtype, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t xi, uintptr_t mask, uintptr_t A,
           uintptr_t c, int64_t B, int64_t d, int64_t F, int64_t K, uintptr_t /*ws*/, int threads) {
            check_call("jacobian", B, d, F, K, threads, {{W, "W"}, {b, "b"}, {PhiT, "PhiT"}, {xi, "xi"}},
                       {{mask, "mask"}, {A, "A"}, {c, "c"}});
            py::gil_scoped_release release;
            dispatch(dtype, wdtype, [&](auto t, auto wt) {
                using T = decltype(t);
                using WT = decltype(wt);
                jacobian<T, WT>(ptr<const WT>(W), ptr<const T>(b), ptr<const T>(PhiT), ptr<const T>(xi),
                                ptr<const uint64_t>(mask), ptr<T>(A), ptr<T>(c), B, d, F, K, threads);
            });
        },
        "A = Φ D W [B, K, d] and c = ξ − Φ D b [B, K]");

    m.def(
        "safeflow_loop",
        [](int dtype, int wdtype, uintptr_t h, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t xi, uintptr_t P,
           uintptr_t wnorm, uintptr_t basis, uintptr_t basis_WT, int64_t rank, uintptr_t x, uintptr_t steps, int64_t M,
           int64_t d, int64_t F, int64_t K, double lr, double lambda_safe, double lambda_unsafe, double margin,
           int64_t max_steps, uintptr_t /*ws*/, int threads) {
            check_call("safeflow_loop", M, d, F, K, threads,
                       {{W, "W"}, {b, "b"}, {PhiT, "PhiT"}, {xi, "xi"}, {wnorm, "wnorm"}},
                       {{h, "h"}, {x, "x"}, {steps, "steps"}});
            require(max_steps >= 0, "safeflow_loop", "max_steps must be >= 0, got " + std::to_string(max_steps));
            require(rank >= 0 && rank <= d, "safeflow_loop",
                    "the basis rank must be in [0, d], got " + std::to_string(rank));
            if (rank > 0) {
                check_ptr("safeflow_loop", basis, "basis");
                check_ptr("safeflow_loop", basis_WT, "basis_WT");
            }
            py::gil_scoped_release release;
            const LoopConfig cfg{lr, lambda_safe, lambda_unsafe, margin, max_steps};
            dispatch(dtype, wdtype, [&](auto t, auto wt) {
                using T = decltype(t);
                using WT = decltype(wt);
                const LoopBound<T> bound{ptr<const T>(wnorm), ptr<const T>(basis), ptr<const T>(basis_WT), rank};
                safeflow_loop<T, WT>(ptr<const T>(h), ptr<const WT>(W), ptr<const T>(b), ptr<const T>(PhiT),
                                     ptr<const T>(xi), ptr<const T>(P), bound, ptr<T>(x), ptr<int64_t>(steps), M, d, F,
                                     K, cfg, threads);
            });
        },
        "the SafeFlow loop: x [M, d] and steps [M] (P may be 0: no preconditioner; wnorm [F] = ‖W_j‖; "
        "basis [rank, d] and basis_WT = basis Wᵀ [rank, F] may be 0 with rank 0)");

    m.def(
        "project",
        [](uintptr_t h0, uintptr_t A, uintptr_t c, uintptr_t margin, uintptr_t M, uintptr_t hout, uintptr_t lam,
           uintptr_t status, int64_t B, int64_t d, int64_t K, uintptr_t /*ws*/, int threads) {
            py::gil_scoped_release release;
            project(ptr<const double>(h0), ptr<const double>(A), ptr<const double>(c), ptr<const double>(margin),
                    ptr<const double>(M), ptr<double>(hout), ptr<double>(lam), ptr<int64_t>(status), B, d, K, threads);
        },
        "float64 projections of h0 [B, d] onto {A h <= c - margin} in the metric M [d, d] (0: identity): "
        "h [B, d], the dual solution [B, K] and status codes [B]");

    m.def(
        "projection_steer",
        [](int dtype, int wdtype, uintptr_t h, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t xi, uintptr_t M,
           uintptr_t WM, uintptr_t wnorm, uintptr_t out, uintptr_t rounds, uintptr_t status, int64_t n,
           int64_t d, int64_t F, int64_t K, double margin, int64_t max_rounds, int64_t ramp_rounds,
           int64_t bisections, uintptr_t /*ws*/, int threads) {
            py::gil_scoped_release release;
            const SteerConfig cfg{margin, max_rounds, ramp_rounds, bisections};
            dispatch(dtype, wdtype, [&](auto t, auto wt) {
                using T = decltype(t);
                using WT = decltype(wt);
                projection_steer<T, WT>(ptr<const T>(h), ptr<const WT>(W), ptr<const T>(b), ptr<const T>(PhiT),
                                        ptr<const T>(xi), ptr<const double>(M), ptr<const T>(WM),
                                        ptr<const double>(wnorm), ptr<T>(out), ptr<int64_t>(rounds),
                                        ptr<int64_t>(status), n, d, F, K, cfg, threads);
            });
        },
        "the projection steerer (native solver): rows [n, d] (NaN where the first round failed), rounds [n] and "
        "the status of each row's last projection [n] (M may be 0: Euclidean; WM, the rows of W M in the states' "
        "dtype, may be 0)");
}
