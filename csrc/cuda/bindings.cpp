// pybind11 bindings of the CUDA kernels: integer device addresses and a cudaStream_t handle
// (torch.cuda.current_stream().cuda_stream) in, launches queued on that stream, nothing waited
// for. Argument order matches the CPU module (csrc/cpu/bindings.cpp) with the stream in place of
// the thread count. A launch error is raised as RuntimeError; sizes, addresses and the workspace
// are checked first (../common/guards.h), a bad one raised as ValueError.
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "../common/guards.h"
#include "polytope_cuda.h"

namespace py = pybind11;
namespace sc = safeflow_cuda;

namespace {

void* vp(uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(const std::string& error) {
    if (!error.empty()) throw std::runtime_error("safeflow CUDA kernel failed: " + error);
}

// Sizes, the addresses every call needs (../common/guards.h), the rows' buffers when there are rows,
// and the workspace when the operation needs one; std::invalid_argument otherwise.
void check_call(const char* op, int dt, int64_t B, int64_t d, int64_t F, int64_t K, uintptr_t ws,
                std::initializer_list<std::pair<uintptr_t, const char*>> always,
                std::initializer_list<std::pair<uintptr_t, const char*>> rows) {
    safeflow_guards::check_sizes(op, B, d, F, K);
    for (auto [p, name] : always) safeflow_guards::check_ptr(op, p, name);
    if (B == 0) return;
    for (auto [p, name] : rows) safeflow_guards::check_ptr(op, p, name);
    if (sc::workspace_bytes(op, dt, B, d, F, K) > 0) safeflow_guards::check_ptr(op, ws, "workspace");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "safeflow fused facet-violation kernels (CUDA)";
    m.attr("TILE") = 64;
    m.def("workspace_bytes", &sc::workspace_bytes, "scratch bytes an operation needs on the device");
    m.def("forward", [](int dt, int wt, uintptr_t H, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t xi,
                        uintptr_t V, uintptr_t mask, uintptr_t feat, int64_t B, int64_t d, int64_t F, int64_t K,
                        uintptr_t ws, uintptr_t stream) {
        check_call("forward", dt, B, d, F, K, ws, {{W, "W"}, {b, "b"}, {PhiT, "PhiT"}, {xi, "xi"}},
                   {{H, "H"}, {V, "V"}});
        if (!mask) throw std::invalid_argument("the CUDA forward needs a mask buffer");
        if (feat) throw std::invalid_argument("the CUDA forward does not store features; pass 0");
        check(sc::forward(dt, wt, vp(H), vp(W), vp(b), vp(PhiT), vp(xi), vp(V), reinterpret_cast<uint64_t*>(mask), B,
                          d, F, K, vp(ws), vp(stream)));
    });
    m.def("vjp_input", [](int dt, int wt, uintptr_t W, uintptr_t PhiT, uintptr_t mask, uintptr_t C, uintptr_t V,
                          uintptr_t gH, int64_t B, int64_t d, int64_t F, int64_t K, uintptr_t ws, uintptr_t stream) {
        check_call("vjp_input", dt, B, d, F, K, ws, {{W, "W"}, {PhiT, "PhiT"}}, {{mask, "mask"}, {C, "C"}, {gH, "gH"}});
        check(sc::vjp_input(dt, wt, vp(W), vp(PhiT), reinterpret_cast<const uint64_t*>(mask), vp(C), vp(V), vp(gH), B,
                            d, F, K, vp(ws), vp(stream)));
    });
    m.def("param_grads", [](int dt, uintptr_t H, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t mask,
                            uintptr_t feat, uintptr_t C, uintptr_t gW, uintptr_t gb, uintptr_t gPhiT, int64_t B,
                            int64_t d, int64_t F, int64_t K, uintptr_t ws, uintptr_t stream) {
        check_call("param_grads", dt, B, d, F, K, ws, {{W, "W"}, {b, "b"}, {PhiT, "PhiT"}},
                   {{H, "H"}, {mask, "mask"}, {C, "C"}});
        if (feat) throw std::invalid_argument("the CUDA parameter gradients recompute features; pass feat = 0");
        check(sc::param_grads(dt, vp(H), vp(W), vp(b), vp(PhiT), reinterpret_cast<const uint64_t*>(mask), vp(C),
                              vp(gW), vp(gb), vp(gPhiT), B, d, F, K, vp(ws), vp(stream)));
    });
    m.def("jacobian", [](int dt, int wt, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t xi, uintptr_t mask,
                         uintptr_t A, uintptr_t c, int64_t B, int64_t d, int64_t F, int64_t K, uintptr_t ws,
                         uintptr_t stream) {
        check_call("jacobian", dt, B, d, F, K, ws, {{W, "W"}, {b, "b"}, {PhiT, "PhiT"}, {xi, "xi"}},
                   {{mask, "mask"}, {A, "A"}, {c, "c"}});
        check(sc::jacobian(dt, wt, vp(W), vp(b), vp(PhiT), vp(xi), reinterpret_cast<const uint64_t*>(mask), vp(A),
                           vp(c), B, d, F, K, vp(ws), vp(stream)));
    });
    // wnorm, basis, basis_W, rank: the CPU loop's bound for skipping features; the CUDA loop computes every
    // feature and ignores them (same call as the CPU module).
    m.def("safeflow_loop", [](int dt, int wt, uintptr_t h, uintptr_t W, uintptr_t b, uintptr_t PhiT, uintptr_t xi,
                              uintptr_t P, uintptr_t /*wnorm*/, uintptr_t /*basis*/, uintptr_t /*basis_W*/,
                              int64_t /*rank*/, uintptr_t x, uintptr_t steps, int64_t M, int64_t d, int64_t F,
                              int64_t K, double lr, double lambda_safe, double lambda_unsafe, double margin,
                              int64_t max_steps, uintptr_t ws, uintptr_t stream) {
        check_call("safeflow_loop", dt, M, d, F, K, ws, {{W, "W"}, {b, "b"}, {PhiT, "PhiT"}, {xi, "xi"}},
                   {{h, "h"}, {x, "x"}, {steps, "steps"}});
        if (max_steps < 0) throw std::invalid_argument("safeflow kernel safeflow_loop: max_steps must be >= 0");
        check(sc::safeflow_loop(dt, wt, vp(h), vp(W), vp(b), vp(PhiT), vp(xi), vp(P), vp(x),
                                reinterpret_cast<int64_t*>(steps), M, d, F, K, lr, lambda_safe, lambda_unsafe, margin,
                                max_steps, vp(ws), vp(stream)));
    });
}
