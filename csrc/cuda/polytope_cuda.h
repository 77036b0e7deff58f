// Host launchers of the CUDA kernels (same math and layouts as csrc/cpu/polytope_cpu.h).
//
// Plain C++ declarations only (no CUDA headers), so the pybind11 bindings compile with the host
// compiler. Buffers are device addresses of contiguous row-major arrays; `stream` is a
// cudaStream_t (torch.cuda.current_stream().cuda_stream); `ws` is scratch memory of
// workspace_bytes(...) bytes. Launches are asynchronous: no call synchronises the host.
// Type codes: 0 = float32, 1 = float64, 2 = bfloat16, 3 = float16; W may be bfloat16 with
// float32 states; accumulation is float32 (float64 for float64). Each launcher returns a CUDA
// error string, empty on success.
#pragma once

#include <cstdint>
#include <string>

namespace safeflow_cuda {

int64_t workspace_bytes(const std::string& op, int dtype, int64_t B, int64_t d, int64_t F, int64_t K);

std::string forward(int dtype, int wdtype, const void* H, const void* W, const void* b, const void* PhiT,
                    const void* xi, void* V, uint64_t* mask, int64_t B, int64_t d, int64_t F, int64_t K, void* ws,
                    void* stream);

std::string vjp_input(int dtype, int wdtype, const void* W, const void* PhiT, const uint64_t* mask, const void* C,
                      const void* V, void* gH, int64_t B, int64_t d, int64_t F, int64_t K, void* ws, void* stream);

std::string param_grads(int dtype, const void* H, const void* W, const void* b, const void* PhiT,
                        const uint64_t* mask, const void* C, void* gW, void* gb, void* gPhiT, int64_t B, int64_t d,
                        int64_t F, int64_t K, void* ws, void* stream);

std::string jacobian(int dtype, int wdtype, const void* W, const void* b, const void* PhiT, const void* xi,
                     const uint64_t* mask, void* A, void* c, int64_t B, int64_t d, int64_t F, int64_t K, void* ws,
                     void* stream);

std::string safeflow_loop(int dtype, int wdtype, const void* h, const void* W, const void* b, const void* PhiT,
                          const void* xi, const void* P, void* x, int64_t* steps, int64_t M, int64_t d, int64_t F,
                          int64_t K, double lr, double lambda_safe, double lambda_unsafe, double margin,
                          int64_t max_steps, void* ws, void* stream);

}  // namespace safeflow_cuda
