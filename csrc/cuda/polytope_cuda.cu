// CUDA implementation of the fused facet-violation kernels (math and layouts: polytope_cuda.h and
// csrc/cpu/polytope_cpu.h). SIMT kernels with 16-byte loads of W where rows are aligned; every
// accumulation is float32 (float64 for float64 inputs); the [B, F] features are never stored.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "../common.h"
#include "polytope_cuda.h"

namespace cg = cooperative_groups;
using ull = unsigned long long;

namespace safeflow_cuda {
namespace {

constexpr int kTile = safeflow_common::kTileFeatures;  // features per mask word
constexpr int kThreads = 256;             // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;                  // rows per forward work item
constexpr int kChunk = kThreads;          // features per vjp work item (one per thread)
constexpr int kCols = 8;                  // columns per thread
constexpr int kSlice = kThreads * kCols;  // columns per block
constexpr int kFeat = 8;                  // features per parameter-gradient block
constexpr int kRowChunk = kThreads / kFeat;

template <typename T>
struct Acc {
    using type = float;
};
template <>
struct Acc<double> {
    using type = double;
};

__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ double tof(double x) { return x; }
__device__ __forceinline__ float tof(__half x) { return __half2float(x); }
__device__ __forceinline__ float tof(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(double* p, double v) { *p = v; }
__device__ __forceinline__ void put(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// Eight consecutive elements from a 16-byte aligned address.
__device__ __forceinline__ void load8(const float* p, float* o) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
__device__ __forceinline__ void load8(const double* p, double* o) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const double2 a = reinterpret_cast<const double2*>(p)[i];
        o[2 * i] = a.x, o[2 * i + 1] = a.y;
    }
}
__device__ __forceinline__ void load8(const __half* p, float* o) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        o[2 * i] = f.x, o[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* o) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        o[2 * i] = f.x, o[2 * i + 1] = f.y;
    }
}

// Columns c0 .. c0+7 of one row (zeros past d); vector load when rows are 16-byte aligned.
template <typename T, typename A>
__device__ __forceinline__ void load_cols(const T* row, int64_t c0, int64_t d, bool vec, A* o) {
    if (vec && c0 + kCols <= d) {
        load8(row + c0, o);
        return;
    }
#pragma unroll
    for (int i = 0; i < kCols; ++i) o[i] = c0 + i < d ? A(tof(row[c0 + i])) : A(0);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int64_t mask_words(int64_t F) { return (F + kTile - 1) / kTile; }

__device__ __forceinline__ bool active(const ull* mask, int64_t row, int64_t j, int64_t F) {
    return j < F && ((mask[row * mask_words(F) + j / kTile] >> (j % kTile)) & 1ull);
}

// One forward work item: tile w of 64 features for rows r0 .. r0+rr of X. Adds ReLU(pre) Φᵀ into
// Vacc (atomics) and writes the mask words. Rows with alive[r] == 0 are skipped when alive is set.
template <typename T, typename WT, typename A>
__device__ void forward_item(const T* X, const WT* W, const T* b, const T* PhiT, A* Vacc, ull* mask, int64_t w,
                             int64_t r0, int rr, int64_t d, int64_t F, int64_t K, bool vec, const int* alive,
                             A (*fs)[kTile], ull* words) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    if (tid < kRows) words[tid] = 0;
    bool use[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) use[r] = r < rr && (alive == nullptr || alive[r0 + r]);
    __syncthreads();
    for (int jj = warp; jj < kTile; jj += kWarps) {
        const int64_t j = w * kTile + jj;
        A acc[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] = 0;
        if (j < F) {
            const WT* wr = W + j * d;
            if (vec) {
#pragma unroll 4
                for (int64_t t = lane * kCols; t < d; t += 32 * kCols) {
                    A wv[kCols];
                    load8(wr + t, wv);
#pragma unroll
                    for (int r = 0; r < kRows; ++r)
                        if (use[r]) {
                            A hv[kCols];
                            load8(X + (r0 + r) * d + t, hv);
#pragma unroll
                            for (int i = 0; i < kCols; ++i) acc[r] += wv[i] * hv[i];
                        }
                }
            } else {
                for (int64_t t = lane; t < d; t += 32) {
                    const A wv = tof(wr[t]);
#pragma unroll
                    for (int r = 0; r < kRows; ++r)
                        if (use[r]) acc[r] += wv * A(tof(X[(r0 + r) * d + t]));
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                A f = 0;
                if (use[r] && j < F) {
                    const A p = acc[r] + A(tof(b[j]));
                    if (!(p <= A(0))) {  // active, or NaN (propagates)
                        f = p;
                        atomicOr(&words[r], 1ull << jj);
                    }
                }
                fs[r][jj] = f;
            }
        }
    }
    __syncthreads();
    for (int64_t idx = tid; idx < rr * K; idx += kThreads) {
        const int64_t r = idx / K, k = idx % K;
        if (!use[0] && !use[1] && !use[2] && !use[3]) break;
        if (alive != nullptr && !alive[r0 + r]) continue;
        // branch-free over the tile (inactive features hold 0) so the loads of Φᵀ overlap
        const int n = static_cast<int>(F - w * kTile < kTile ? F - w * kTile : kTile);
        const T* pt = PhiT + w * kTile * K + k;
        A s = 0;
#pragma unroll 8
        for (int jj = 0; jj < n; ++jj) s += fs[r][jj] * A(tof(pt[jj * K]));
        atomicAdd(&Vacc[(r0 + r) * K + k], s);
    }
    if (tid < rr && use[tid]) mask[(r0 + tid) * mask_words(F) + w] = words[tid];
    __syncthreads();
}

// One input-VJP work item: features c·256 .. c·256+255 of row `row`, column slice `slice`;
// adds Σ_j s_j W_j (s_j = coef · Φ[:, j] for active j) into grow[cols] (atomics).
template <typename T, typename WT, typename A>
__device__ void vjp_item(const WT* W, const T* PhiT, const ull* mask, const A* coef, A* grow, int64_t c, int64_t slice,
                         int64_t row, int64_t d, int64_t F, int64_t K, bool vec, A* s_sh, int* j_sh) {
    __shared__ int counts[kWarps + 1];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t j = c * kChunk + tid;
    const bool act = active(mask, row, j, F);
    A s = 0;
    if (act) {
        const T* pt = PhiT + j * K;
#pragma unroll 8
        for (int64_t k = 0; k < K; ++k) s += coef[k] * A(tof(pt[k]));
    }
    // compact the active features in feature order: warp ballots, then a prefix over warps
    const unsigned ballot = __ballot_sync(0xffffffffu, act);
    if (lane == 0) counts[warp] = __popc(ballot);
    __syncthreads();
    if (tid == 0) {
        int total = 0;
        for (int w = 0; w < kWarps; ++w) {
            const int n = counts[w];
            counts[w] = total;
            total += n;
        }
        counts[kWarps] = total;
    }
    __syncthreads();
    if (act) {
        const int pos = counts[warp] + __popc(ballot & ((1u << lane) - 1u));
        s_sh[pos] = s;
        j_sh[pos] = static_cast<int>(tid);
    }
    __syncthreads();
    const int n = counts[kWarps];
    const int64_t c0 = slice * kSlice + tid * kCols;
    if (c0 < d) {
        A acc[kCols];
#pragma unroll
        for (int i = 0; i < kCols; ++i) acc[i] = 0;
#pragma unroll 4
        for (int q = 0; q < n; ++q) {
            A wv[kCols];
            load_cols(W + (c * kChunk + j_sh[q]) * d, c0, d, vec, wv);
            const A sj = s_sh[q];
#pragma unroll
            for (int i = 0; i < kCols; ++i) acc[i] += sj * wv[i];
        }
#pragma unroll
        for (int i = 0; i < kCols; ++i)
            if (c0 + i < d) atomicAdd(&grow[c0 + i], acc[i]);
    }
    __syncthreads();
}

template <typename T, typename WT, typename A>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* H, const WT* W, const T* b, const T* PhiT,
                                                            A* Vacc, ull* mask, int64_t B, int64_t d, int64_t F,
                                                            int64_t K, bool vec) {
    __shared__ A fs[kRows][kTile];
    __shared__ ull words[kRows];
    const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRows;
    forward_item(H, W, b, PhiT, Vacc, mask, blockIdx.x, r0, static_cast<int>(B - r0 < kRows ? B - r0 : kRows), d, F, K,
                 vec, static_cast<const int*>(nullptr), fs, words);
}

template <typename T, typename A>
__global__ void finish_violations(const A* Vacc, const T* xi, T* V, int64_t B, int64_t K) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * K; i += int64_t(gridDim.x) * blockDim.x)
        put(V + i, Vacc[i] - A(tof(xi[i % K])));
}

template <typename T, typename WT, typename A>
__global__ void __launch_bounds__(kThreads) vjp_kernel(const WT* W, const T* PhiT, const ull* mask, const T* C,
                                                        A* gacc, int64_t d, int64_t F, int64_t K, bool vec) {
    extern __shared__ unsigned char dyn[];
    A* coef = reinterpret_cast<A*>(dyn);
    __shared__ A s_sh[kChunk];
    __shared__ int j_sh[kChunk];
    const int64_t row = blockIdx.z;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) coef[k] = tof(C[row * K + k]);
    __syncthreads();
    vjp_item<T, WT, A>(W, PhiT, mask, coef, gacc + row * d, blockIdx.x, blockIdx.y, row, d, F, K, vec, s_sh, j_sh);
}

template <typename T, typename A>
__global__ void finish_vjp(const A* gacc, const T* V, T* gH, int64_t B, int64_t d, int64_t K) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * d; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t row = i / d;
        bool nan = false;
        for (int64_t k = 0; V != nullptr && k < K; ++k) nan = nan || isnan(A(tof(V[row * K + k])));
        put(gH + i, nan ? A(NAN) : gacc[i]);
    }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) param_grads_kernel(const T* H, const T* W, const T* b, const T* PhiT,
                                                                const ull* mask, const T* C, T* gW, T* gb, T* gPhiT,
                                                                int64_t B, int64_t d, int64_t F, int64_t K, bool vec) {
    extern __shared__ unsigned char dyn[];
    A* gphi = reinterpret_cast<A*>(dyn);  // [kFeat, K]
    __shared__ A G[kRowChunk][kFeat], Fv[kRowChunk][kFeat];
    __shared__ bool act_sh[kRowChunk][kFeat];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t j0 = int64_t(blockIdx.x) * kFeat, slice = blockIdx.y, c0 = slice * kSlice + tid * kCols;
    A acc[kFeat][kCols];
#pragma unroll
    for (int f = 0; f < kFeat; ++f)
#pragma unroll
        for (int i = 0; i < kCols; ++i) acc[f][i] = 0;
    A gbacc = 0;
    for (int64_t idx = tid; idx < kFeat * K; idx += kThreads) gphi[idx] = 0;
    for (int64_t r0 = 0; r0 < B; r0 += kRowChunk) {
        {
            const int r = tid / kFeat, f = tid % kFeat;
            const int64_t row = r0 + r, j = j0 + f;
            const bool act = row < B && active(mask, row, j, F);
            A g = 0;
            if (act)
                for (int64_t k = 0; k < K; ++k) g += A(tof(C[row * K + k])) * A(tof(PhiT[j * K + k]));
            G[r][f] = g;
            Fv[r][f] = 0;
            act_sh[r][f] = act;
        }
        __syncthreads();
        if (gPhiT != nullptr && slice == 0) {  // recompute the active features for ∂Φ = Cᵀ ReLU(H Wᵀ + b)
            for (int p = warp; p < kRowChunk * kFeat; p += kWarps) {
                const int r = p / kFeat, f = p % kFeat;
                if (!act_sh[r][f]) continue;
                const int64_t row = r0 + r, j = j0 + f;
                A s = 0;
                for (int64_t t = lane; t < d; t += 32) s += A(tof(W[j * d + t])) * A(tof(H[row * d + t]));
                s = warp_sum(s);
                if (lane == 0) Fv[r][f] = s + A(tof(b[j]));
            }
            __syncthreads();
            for (int64_t idx = tid; idx < kFeat * K; idx += kThreads) {
                const int f = static_cast<int>(idx / K);
                const int64_t k = idx % K;
                A s = 0;
                for (int r = 0; r < kRowChunk && r0 + r < B; ++r) s += A(tof(C[(r0 + r) * K + k])) * Fv[r][f];
                gphi[idx] += s;
            }
        }
        if (c0 < d)
            for (int r = 0; r < kRowChunk && r0 + r < B; ++r) {
                A hv[kCols];
                load_cols(H + (r0 + r) * d, c0, d, vec, hv);
#pragma unroll
                for (int f = 0; f < kFeat; ++f) {
                    const A g = G[r][f];
                    if (g != A(0))
#pragma unroll
                        for (int i = 0; i < kCols; ++i) acc[f][i] += g * hv[i];
                }
            }
        if (tid < kFeat)
            for (int r = 0; r < kRowChunk; ++r) gbacc += G[r][tid];
        __syncthreads();
    }
    if (gW != nullptr && c0 < d)
#pragma unroll
        for (int f = 0; f < kFeat; ++f)
            if (j0 + f < F)
#pragma unroll
                for (int i = 0; i < kCols; ++i)
                    if (c0 + i < d) put(gW + (j0 + f) * d + c0 + i, acc[f][i]);
    if (slice != 0) return;
    if (gb != nullptr && tid < kFeat && j0 + tid < F) put(gb + j0 + tid, gbacc);
    if (gPhiT != nullptr)
        for (int64_t idx = tid; idx < kFeat * K; idx += kThreads)
            if (j0 + idx / K < F) put(gPhiT + j0 * K + idx, gphi[idx]);
}

template <typename T, typename WT, typename A>
__global__ void __launch_bounds__(kThreads) jacobian_kernel(const WT* W, const T* PhiT, const ull* mask, T* Aout,
                                                             int64_t d, int64_t F, int64_t K, bool vec) {
    const int64_t row = blockIdx.x, k0 = int64_t(blockIdx.y) * kFeat;
    const int64_t c0 = int64_t(blockIdx.z) * kSlice + threadIdx.x * kCols;
    if (c0 >= d) return;
    A acc[kFeat][kCols];
#pragma unroll
    for (int f = 0; f < kFeat; ++f)
#pragma unroll
        for (int i = 0; i < kCols; ++i) acc[f][i] = 0;
    const int64_t nw = mask_words(F);
    for (int64_t w = 0; w < nw; ++w) {
        ull word = mask[row * nw + w];
        while (word) {
            const int64_t j = w * kTile + __ffsll(static_cast<long long>(word)) - 1;
            word &= word - 1;
            A wv[kCols];
            load_cols(W + j * d, c0, d, vec, wv);
#pragma unroll
            for (int f = 0; f < kFeat; ++f) {
                const A p = k0 + f < K ? A(tof(PhiT[j * K + k0 + f])) : A(0);
#pragma unroll
                for (int i = 0; i < kCols; ++i) acc[f][i] += p * wv[i];
            }
        }
    }
#pragma unroll
    for (int f = 0; f < kFeat; ++f)
        if (k0 + f < K)
#pragma unroll
            for (int i = 0; i < kCols; ++i)
                if (c0 + i < d) put(Aout + (row * K + k0 + f) * d + c0 + i, acc[f][i]);
}

// c[row, k] = ξ_k − Σ_{active j} Φ[k, j] b_j; one warp per (row, k).
template <typename T, typename A>
__global__ void offsets_kernel(const T* b, const T* PhiT, const T* xi, const ull* mask, T* c, int64_t F, int64_t K) {
    const int64_t row = blockIdx.x, k = blockIdx.y;
    A s = 0;
    for (int64_t j = threadIdx.x; j < F; j += 32)
        if (active(mask, row, j, F)) s += A(tof(PhiT[j * K + k])) * A(tof(b[j]));
    s = warp_sum(s);
    if (threadIdx.x == 0) put(c + row * K + k, A(tof(xi[k])) - s);
}

// The SafeFlow loop as one cooperative kernel: per step, a forward phase over (tile, row block)
// items, a VJP phase over (feature chunk, column slice, row) items and an update phase, separated
// by grid-wide barriers. alive[2][M] is double-buffered by step parity.
template <typename T, typename WT, typename A>
__global__ void __launch_bounds__(kThreads)
    loop_kernel(const T* h, const WT* W, const T* b, const T* PhiT, const T* xi, const T* P, T* x, int64_t* steps,
                int64_t M, int64_t d, int64_t F, int64_t K, A lr, A ls, A lu, A margin, int64_t max_steps, bool vec,
                ull* mask, A* Vacc, A* g, int* alive) {
    cg::grid_group grid = cg::this_grid();
    extern __shared__ unsigned char dyn[];
    A* coef = reinterpret_cast<A*>(dyn);
    __shared__ A fs[kRows][kTile];
    __shared__ ull words[kRows];
    __shared__ A s_sh[kChunk];
    __shared__ int j_sh[kChunk];
    const int tid = threadIdx.x;
    const int64_t gtid = blockIdx.x * int64_t(kThreads) + tid, gsize = int64_t(gridDim.x) * kThreads;
    const int64_t nw = mask_words(F), nrb = (M + kRows - 1) / kRows, nchunk = (F + kChunk - 1) / kChunk;
    const int64_t nslice = (d + kSlice - 1) / kSlice;
    const A inv_d = A(1) / A(d), neg_margin = -margin;
    for (int64_t i = gtid; i < M * d; i += gsize) x[i] = h[i];
    for (int64_t i = gtid; i < M * K; i += gsize) Vacc[i] = 0;
    for (int64_t i = gtid; i < M; i += gsize) alive[i] = 1, steps[i] = 0;
    grid.sync();
    int cur = 0;
    for (int64_t step = 0; step < max_steps; ++step) {
        const int* al = alive + cur * M;
        int* next = alive + (1 - cur) * M;
        for (int64_t i = gtid; i < M * d; i += gsize) g[i] = 0;
        for (int64_t item = blockIdx.x; item < nw * nrb; item += gridDim.x) {
            const int64_t w = item % nw, r0 = (item / nw) * kRows;
            forward_item(x, W, b, PhiT, Vacc, mask, w, r0, static_cast<int>(M - r0 < kRows ? M - r0 : kRows), d, F, K,
                         vec, al, fs, words);
        }
        grid.sync();
        // a row goes on while alive, finite and some v_k > −margin; coef = λ_safe + λ_unsafe·[v > −margin]
        for (int64_t item = blockIdx.x; item < M * nchunk * nslice; item += gridDim.x) {
            const int64_t row = item / (nchunk * nslice), c = (item / nslice) % nchunk, slice = item % nslice;
            bool finite = true, outside = false;
            for (int64_t k = tid; k < K; k += kThreads) {
                const A v = Vacc[row * K + k] - A(tof(xi[k]));
                finite = finite && isfinite(v);
                outside = outside || v > neg_margin;
                coef[k] = ls + lu * A(v > neg_margin);
            }
            finite = __syncthreads_and(finite);
            outside = __syncthreads_or(outside);
            if (!(al[row] && finite && outside)) continue;
            vjp_item<T, WT, A>(W, PhiT, mask, coef, g + row * d, c, slice, row, d, F, K, vec, s_sh, j_sh);
        }
        if (blockIdx.x == 0)
            for (int64_t row = tid; row < M; row += kThreads) {
                bool go = al[row] != 0, outside = false;
                for (int64_t k = 0; k < K; ++k) {
                    const A v = Vacc[row * K + k] - A(tof(xi[k]));
                    go = go && isfinite(v);
                    outside = outside || v > neg_margin;
                }
                next[row] = go && outside;
                steps[row] += next[row];
            }
        grid.sync();
        for (int64_t i = gtid; i < M * K; i += gsize) Vacc[i] = 0;
        if (P == nullptr) {
            for (int64_t i = gtid; i < M * d; i += gsize)
                if (next[i / d]) {
                    const A diff = A(tof(x[i])) - A(tof(h[i]));
                    put(x + i, A(tof(x[i])) - lr * (g[i] + A((diff > 0) - (diff < 0)) * inv_d));
                }
        } else {
            for (int64_t i = gtid; i < M * d; i += gsize)
                if (next[i / d]) {
                    const A diff = A(tof(x[i])) - A(tof(h[i]));
                    g[i] += A((diff > 0) - (diff < 0)) * inv_d;
                }
            grid.sync();
            for (int64_t i = gtid; i < M * d; i += gsize) {
                const int64_t row = i / d, col = i % d;
                if (!next[row]) continue;
                A s = 0;
                for (int64_t t = 0; t < d; ++t) s += g[row * d + t] * A(tof(P[t * d + col]));
                put(x + i, A(tof(x[i])) - lr * s);
            }
        }
        grid.sync();
        bool any = false;
        for (int64_t row = 0; row < M && !any; ++row) any = next[row] != 0;
        cur = 1 - cur;
        if (!any) break;
    }
}

template <typename T>
struct Tag {
    using type = T;
};

template <typename Fn>
bool dispatch(int dtype, int wdtype, Fn&& fn) {
    using namespace safeflow_common;
    if (dtype == kFloat32 && wdtype == kFloat32) return fn(Tag<float>{}, Tag<float>{}), true;
    if (dtype == kFloat64 && wdtype == kFloat64) return fn(Tag<double>{}, Tag<double>{}), true;
    if (dtype == kFloat32 && wdtype == kBFloat16) return fn(Tag<float>{}, Tag<__nv_bfloat16>{}), true;
    if (dtype == kBFloat16 && wdtype == kBFloat16) return fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{}), true;
    if (dtype == kFloat16 && wdtype == kFloat16) return fn(Tag<__half>{}, Tag<__half>{}), true;
    return false;
}

std::string status(bool dispatched) {
    if (!dispatched) return "unsupported dtype pair (states, weights)";
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096)); }

int64_t acc_size(int dtype) { return dtype == 1 ? 8 : 4; }

constexpr int64_t kMaxRows = 65535;  // grid.y/z limit for rows (and facets)
const char* const kTooManyRows = "more than 65535 rows (or facets) in one call; split the batch";
int64_t words(int64_t F) { return (F + kTile - 1) / kTile; }
int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

}  // namespace

int64_t workspace_bytes(const std::string& op, int dtype, int64_t B, int64_t d, int64_t F, int64_t K) {
    const int64_t a = acc_size(dtype);
    if (op == "forward") return round16(B * K * a);
    if (op == "vjp_input") return round16(B * d * a);
    if (op == "safeflow_loop") return B * words(F) * 8 + round16(B * K * a) + round16(B * d * a) + 2 * B * 4;
    return 0;
}

std::string forward(int dtype, int wdtype, const void* H, const void* W, const void* b, const void* PhiT,
                    const void* xi, void* V, uint64_t* mask, int64_t B, int64_t d, int64_t F, int64_t K, void* ws,
                    void* stream) {
    if (B > kMaxRows) return kTooManyRows;
    auto s = static_cast<cudaStream_t>(stream);
    const bool vec = d % kCols == 0 && aligned(H) && aligned(W);
    return status(dispatch(dtype, wdtype, [&](auto t, auto wt) {
        using T = typename decltype(t)::type;
        using WT = typename decltype(wt)::type;
        using A = typename Acc<T>::type;
        A* Vacc = static_cast<A*>(ws);
        cudaMemsetAsync(Vacc, 0, B * K * sizeof(A), s);
        // a null mask still needs somewhere to write: reuse no buffer, so require one
        const dim3 grid(static_cast<unsigned>(words(F)), static_cast<unsigned>((B + kRows - 1) / kRows));
        forward_kernel<T, WT, A><<<grid, kThreads, 0, s>>>(static_cast<const T*>(H), static_cast<const WT*>(W),
                                                           static_cast<const T*>(b), static_cast<const T*>(PhiT),
                                                           Vacc, reinterpret_cast<ull*>(mask), B, d, F, K, vec);
        finish_violations<T, A><<<blocks_for(B * K), kThreads, 0, s>>>(Vacc, static_cast<const T*>(xi),
                                                                        static_cast<T*>(V), B, K);
    }));
}

std::string vjp_input(int dtype, int wdtype, const void* W, const void* PhiT, const uint64_t* mask, const void* C,
                      const void* V, void* gH, int64_t B, int64_t d, int64_t F, int64_t K, void* ws, void* stream) {
    if (B > kMaxRows) return kTooManyRows;
    auto s = static_cast<cudaStream_t>(stream);
    const bool vec = d % kCols == 0 && aligned(W);
    return status(dispatch(dtype, wdtype, [&](auto t, auto wt) {
        using T = typename decltype(t)::type;
        using WT = typename decltype(wt)::type;
        using A = typename Acc<T>::type;
        A* gacc = static_cast<A*>(ws);
        cudaMemsetAsync(gacc, 0, B * d * sizeof(A), s);
        const dim3 grid(static_cast<unsigned>((F + kChunk - 1) / kChunk), static_cast<unsigned>((d + kSlice - 1) / kSlice),
                        static_cast<unsigned>(B));
        vjp_kernel<T, WT, A><<<grid, kThreads, K * sizeof(A), s>>>(
            static_cast<const WT*>(W), static_cast<const T*>(PhiT), reinterpret_cast<const ull*>(mask),
            static_cast<const T*>(C), gacc, d, F, K, vec);
        finish_vjp<T, A><<<blocks_for(B * d), kThreads, 0, s>>>(gacc, static_cast<const T*>(V), static_cast<T*>(gH),
                                                                B, d, K);
    }));
}

std::string param_grads(int dtype, const void* H, const void* W, const void* b, const void* PhiT,
                        const uint64_t* mask, const void* C, void* gW, void* gb, void* gPhiT, int64_t B, int64_t d,
                        int64_t F, int64_t K, void* /*ws*/, void* stream) {
    auto s = static_cast<cudaStream_t>(stream);
    const bool vec = d % kCols == 0 && aligned(H);
    return status(dispatch(dtype, dtype, [&](auto t, auto) {
        using T = typename decltype(t)::type;
        using A = typename Acc<T>::type;
        const dim3 grid(static_cast<unsigned>((F + kFeat - 1) / kFeat), static_cast<unsigned>((d + kSlice - 1) / kSlice));
        param_grads_kernel<T, A><<<grid, kThreads, kFeat * K * sizeof(A), s>>>(
            static_cast<const T*>(H), static_cast<const T*>(W), static_cast<const T*>(b), static_cast<const T*>(PhiT),
            reinterpret_cast<const ull*>(mask), static_cast<const T*>(C), static_cast<T*>(gW), static_cast<T*>(gb),
            static_cast<T*>(gPhiT), B, d, F, K, vec);
    }));
}

std::string jacobian(int dtype, int wdtype, const void* W, const void* b, const void* PhiT, const void* xi,
                     const uint64_t* mask, void* A_, void* c, int64_t B, int64_t d, int64_t F, int64_t K, void* /*ws*/,
                     void* stream) {
    if (B > kMaxRows || K > kMaxRows) return kTooManyRows;
    auto s = static_cast<cudaStream_t>(stream);
    const bool vec = d % kCols == 0 && aligned(W);
    return status(dispatch(dtype, wdtype, [&](auto t, auto wt) {
        using T = typename decltype(t)::type;
        using WT = typename decltype(wt)::type;
        using A = typename Acc<T>::type;
        const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((K + kFeat - 1) / kFeat),
                        static_cast<unsigned>((d + kSlice - 1) / kSlice));
        jacobian_kernel<T, WT, A><<<grid, kThreads, 0, s>>>(static_cast<const WT*>(W), static_cast<const T*>(PhiT),
                                                            reinterpret_cast<const ull*>(mask), static_cast<T*>(A_), d,
                                                            F, K, vec);
        offsets_kernel<T, A><<<dim3(static_cast<unsigned>(B), static_cast<unsigned>(K)), 32, 0, s>>>(
            static_cast<const T*>(b), static_cast<const T*>(PhiT), static_cast<const T*>(xi),
            reinterpret_cast<const ull*>(mask), static_cast<T*>(c), F, K);
    }));
}

std::string safeflow_loop(int dtype, int wdtype, const void* h, const void* W, const void* b, const void* PhiT,
                          const void* xi, const void* P, void* x, int64_t* steps, int64_t M, int64_t d, int64_t F,
                          int64_t K, double lr, double lambda_safe, double lambda_unsafe, double margin,
                          int64_t max_steps, void* ws, void* stream) {
    auto s = static_cast<cudaStream_t>(stream);
    const bool vec = d % kCols == 0 && aligned(h) && aligned(W) && aligned(x);
    std::string error;
    const bool ok = dispatch(dtype, wdtype, [&](auto t, auto wt) {
        using T = typename decltype(t)::type;
        using WT = typename decltype(wt)::type;
        using A = typename Acc<T>::type;
        char* p = static_cast<char*>(ws);
        ull* mask = reinterpret_cast<ull*>(p);
        p += M * words(F) * 8;
        A* Vacc = reinterpret_cast<A*>(p);
        p += round16(M * K * sizeof(A));
        A* g = reinterpret_cast<A*>(p);
        p += round16(M * d * sizeof(A));
        int* alive = reinterpret_cast<int*>(p);
        auto kernel = loop_kernel<T, WT, A>;
        const size_t smem = K * sizeof(A);
        int device = 0, sms = 0, per_sm = 0;
        cudaGetDevice(&device);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
        const int64_t work = std::max(words(F) * ((M + kRows - 1) / kRows),
                                      M * ((F + kChunk - 1) / kChunk) * ((d + kSlice - 1) / kSlice));
        const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(int64_t(sms) * per_sm, work)));
        const T* hp = static_cast<const T*>(h);
        const WT* Wp = static_cast<const WT*>(W);
        const T *bp = static_cast<const T*>(b), *PhiTp = static_cast<const T*>(PhiT), *xip = static_cast<const T*>(xi);
        const T* Pp = static_cast<const T*>(P);
        T* xp = static_cast<T*>(x);
        A lr_ = A(lr), ls = A(lambda_safe), lu = A(lambda_unsafe), m = A(margin);
        void* args[] = {&hp, &Wp, &bp, &PhiTp, &xip, &Pp, &xp, &steps, &M, &d, &F, &K, &lr_, &ls, &lu, &m,
                        &max_steps, const_cast<bool*>(&vec), &mask, &Vacc, &g, &alive};
        const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(blocks),
                                                            dim3(kThreads), args, smem, s);
        if (err != cudaSuccess) error = cudaGetErrorString(err);
    });
    if (!error.empty()) return error;
    return status(ok);
}

}  // namespace safeflow_cuda
