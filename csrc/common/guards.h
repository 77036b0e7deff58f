// Argument guards shared by the CPU and CUDA bindings. The Python side (safeflow/checks.py)
// checks shapes, dtypes and devices before any call; these cheap checks are the second line:
// a size that is not positive, sizes whose products overflow, or a null address for a buffer the
// operation reads or writes would make a kernel read or write out of bounds, so they throw
// std::invalid_argument (pybind11 raises ValueError; safeflow/kernels/compiled.py turns it into
// DataError) before any kernel runs.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace safeflow_guards {

// Largest element count of one buffer: 2^56 elements keep every byte offset (8-byte elements)
// far inside int64_t and size_t.
constexpr int64_t kMaxElements = int64_t{1} << 56;

inline void require(bool ok, const char* op, const std::string& what) {
    if (!ok) throw std::invalid_argument(std::string("safeflow kernel ") + op + ": " + what);
}

// B >= 0 rows (0: nothing to compute), d, F, K >= 1, and every buffer size the operations use
// (B·d, F·d, F·K, B·F, B·K·d, B·ceil(F/64)) below kMaxElements.
inline void check_sizes(const char* op, int64_t B, int64_t d, int64_t F, int64_t K) {
    require(B >= 0, op, "the row count B must be >= 0, got " + std::to_string(B));
    require(d >= 1 && F >= 1 && K >= 1, op,
            "d, F and K must be >= 1, got d=" + std::to_string(d) + ", F=" + std::to_string(F) +
                ", K=" + std::to_string(K));
    const auto fits = [](int64_t a, int64_t b) { return a == 0 || b <= kMaxElements / a; };
    const bool ok = fits(B, d) && fits(F, d) && fits(F, K) && fits(B, F) && fits(B, K) && fits(B * K, d);
    require(ok, op, "the sizes B=" + std::to_string(B) + ", d=" + std::to_string(d) + ", F=" + std::to_string(F) +
                        ", K=" + std::to_string(K) + " overflow a buffer; split the batch");
}

// A buffer the operation needs must have an address.
inline void check_ptr(const char* op, uintptr_t p, const char* name) {
    require(p != 0, op, std::string("buffer ") + name + " is a null address");
}

}  // namespace safeflow_guards
