// Constants shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels, so that the two agree.
#pragma once

namespace safeflow_common {

// Features per tile and per word of the activation bitmask (one bit per feature in a uint64).
constexpr int kTileFeatures = 64;

// Type codes of the bindings (safeflow/kernels/compiled.py, _CODES): states, and weights W.
enum DtypeCode : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

}  // namespace safeflow_common
