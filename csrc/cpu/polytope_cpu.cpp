// CPU implementation of the fused facet-violation kernels (see polytope_cpu.h for the math).
//
// Inner loops run on GCC/Clang vector types sized to the widest vector unit the compiler targets
// (AVX-512, AVX2 or 128-bit); threads (std::thread, no OpenMP runtime to clash with torch's) split
// the features for the forward and parameter gradients and the rows for everything else.
#include "polytope_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace safeflow {
namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct Vec {
    static constexpr int N = kVecBytes / static_cast<int>(sizeof(T));
    typedef T type __attribute__((vector_size(kVecBytes)));
};

constexpr int kRows = 4;  // rows per register block of the dot-product tile

template <typename T>
inline typename Vec<T>::type loadv(const T* p) {
    typename Vec<T>::type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

template <typename T>
inline void storev(T* p, typename Vec<T>::type v) {
    std::memcpy(p, &v, sizeof(v));
}

inline Vec<float>::type loadw(const float* p) { return loadv(p); }
inline Vec<double>::type loadw(const double* p) { return loadv(p); }
inline Vec<float>::type loadw(const bf16* p) {
    typedef uint16_t u16v __attribute__((vector_size(kVecBytes / 2)));
    typedef uint32_t u32v __attribute__((vector_size(kVecBytes)));
    u16v u;
    std::memcpy(&u, p, sizeof(u));
    u32v w = __builtin_convertvector(u, u32v) << 16;
    Vec<float>::type f;
    std::memcpy(&f, &w, sizeof(f));
    return f;
}

inline float tof(float x) { return x; }
inline double tof(double x) { return x; }
inline float tof(bf16 x) {
    uint32_t u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

template <typename T>
inline T hsum(typename Vec<T>::type v) {
    T s = 0;
    for (int i = 0; i < Vec<T>::N; ++i) s += v[i];
    return s;
}

#if defined(__AVX512F__)
// out[0..7] = the horizontal sums of eight 16-float vectors (one shuffle tree instead of eight).
inline void hsum8(const __m512* acc, float* out) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j)
        a[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1)));
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31)));
}
#endif

// Run fn(begin, end) over [0, n) split into at most `threads` contiguous ranges.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn fn) {
    const int64_t T = std::max<int64_t>(1, std::min<int64_t>(threads, n));
    if (T == 1) {
        fn(int64_t{0}, n);
        return;
    }
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < T; ++t) pool.emplace_back(fn, n * t / T, n * (t + 1) / T);
    fn(int64_t{0}, n / T);
    for (auto& th : pool) th.join();
}

// out[r * ldo + j] = Σ_t hrows[r][t] · W[j * d + t] for an R × J block.
template <int R, int J, typename T, typename WT>
inline void dot_block(const T* const* hrows, const WT* W, int64_t d, T* out, int64_t ldo) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    V acc[R][J];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) acc[r][j] = V{};
    int64_t t = 0;
    for (; t + N <= d; t += N) {
        V h[R];
        for (int r = 0; r < R; ++r) h[r] = loadv(hrows[r] + t);
        for (int j = 0; j < J; ++j) {
            const V w = loadw(W + j * d + t);
            for (int r = 0; r < R; ++r) acc[r][j] += h[r] * w;
        }
    }
#if defined(__AVX512F__)
    if constexpr (J == 8 && std::is_same_v<T, float>) {
        for (int r = 0; r < R; ++r) {
            __m512 a[8];
            std::memcpy(a, acc[r], sizeof(a));
            T o[8];
            hsum8(a, o);
            for (int j = 0; j < J; ++j) {
                for (int64_t u = t; u < d; ++u) o[j] += hrows[r][u] * tof(W[j * d + u]);
                out[r * ldo + j] = o[j];
            }
        }
        return;
    }
#endif
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) {
            T s = hsum<T>(acc[r][j]);
            for (int64_t u = t; u < d; ++u) s += hrows[r][u] * tof(W[j * d + u]);
            out[r * ldo + j] = s;
        }
}

// out[q] = h · w[q] for J rows of W anywhere (gathered): J independent sums, each added up in
// dot_block<1, 1>'s order, so the results equal J calls of it.
template <int J, typename T, typename WT>
inline void gathered_dots(const T* h, const WT* const* w, int64_t d, T* out) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    V acc[J];
    for (int q = 0; q < J; ++q) acc[q] = V{};
    int64_t t = 0;
    for (; t + N <= d; t += N) {
        const V x = loadv(h + t);
        for (int q = 0; q < J; ++q) acc[q] += x * loadw(w[q] + t);
    }
    for (int q = 0; q < J; ++q) {
        T s = hsum<T>(acc[q]);
        for (int64_t u = t; u < d; ++u) s += h[u] * tof(w[q][u]);
        out[q] = s;
    }
}

// pre[r * kTile + j] = hrows[r] · W[j] for rr <= kRows rows and fc <= kTile features.
template <typename T, typename WT>
void pre_tile(const T* const* hrows, int64_t rr, const WT* W, int64_t fc, int64_t d, T* pre) {
    int64_t r = 0;
    for (; r + 2 <= rr; r += 2) {  // pairs of rows: 16 accumulators, one shuffle tree per 8 sums
        int64_t j = 0;
        for (; j + 8 <= fc; j += 8) dot_block<2, 8>(hrows + r, W + j * d, d, pre + r * kTile + j, kTile);
        for (; j < fc; ++j) dot_block<2, 1>(hrows + r, W + j * d, d, pre + r * kTile + j, kTile);
    }
    for (; r < rr; ++r) {
        int64_t j = 0;
        for (; j + 8 <= fc; j += 8) dot_block<1, 8>(hrows + r, W + j * d, d, pre + r * kTile + j, kTile);
        for (; j < fc; ++j) dot_block<1, 1>(hrows + r, W + j * d, d, pre + r * kTile + j, kTile);
    }
}

#if defined(__AVX512BF16__)
constexpr bool kNativeBf16 = true;

inline uint16_t to_bf16(float x) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    if (std::isnan(x)) return 0x7fc0;
    return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// out[j * ldo] = h · W[j] for J bfloat16 rows of W and a bfloat16 state row, with the
// processor's bfloat16 dot-product instruction (pairs of products accumulated in float32).
template <int J>
inline void dot_bf16(const uint16_t* h, const bf16* W, int64_t d, float* out) {
    __m512 acc[J];
    for (int j = 0; j < J; ++j) acc[j] = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 32 <= d; t += 32) {
        const __m512bh hv = (__m512bh)_mm512_loadu_si512(h + t);
        for (int j = 0; j < J; ++j)
            acc[j] = _mm512_dpbf16_ps(acc[j], hv, (__m512bh)_mm512_loadu_si512(W + j * d + t));
    }
    if constexpr (J == 8) {
        hsum8(acc, out);
    } else {
        for (int j = 0; j < J; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
    }
    for (int j = 0; j < J; ++j)
        for (int64_t u = t; u < d; ++u) out[j] += tof(bf16{h[u]}) * tof(W[j * d + u]);
}

void pre_tile_bf16(const uint16_t* h, const bf16* W, int64_t fc, int64_t d, float* pre) {
    int64_t j = 0;
    for (; j + 8 <= fc; j += 8) dot_bf16<8>(h, W + j * d, d, pre + j);
    for (; j < fc; ++j) dot_bf16<1>(h, W + j * d, d, pre + j);
}
#else
constexpr bool kNativeBf16 = false;
#endif

// Rows per packed block: two vectors of rows side by side, so W is read once per block.
template <typename T>
constexpr int packed_rows() {
    return 2 * Vec<T>::N;
}

// Hp [nblocks][d][P]: rows of H interleaved by block of P rows (zero padded), so that one vector
// load reads one column of up to P rows.
template <typename T>
std::vector<T> pack_rows(const T* H, int64_t B, int64_t d) {
    constexpr int P = packed_rows<T>();
    const int64_t nb = (B + P - 1) / P;
    std::vector<T> Hp(nb * d * P, T(0));
    for (int64_t r = 0; r < B; ++r)
        for (int64_t t = 0; t < d; ++t) Hp[((r / P) * d + t) * P + r % P] = H[r * d + t];
    return Hp;
}

// out[j * P + r] = Σ_t Hp[t, r] · W[j, t] for J features and P packed rows (outer-product form).
template <int J, typename T, typename WT>
inline void outer_block(const T* Hp, const WT* W, int64_t d, T* out) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    V a0[J], a1[J];
    for (int j = 0; j < J; ++j) a0[j] = a1[j] = V{};
    for (int64_t t = 0; t < d; ++t) {
        const V h0 = loadv(Hp + t * 2 * N), h1 = loadv(Hp + t * 2 * N + N);
        for (int j = 0; j < J; ++j) {
            const T w = tof(W[j * d + t]);
            a0[j] += h0 * w;
            a1[j] += h1 * w;
        }
    }
    for (int j = 0; j < J; ++j) {
        storev(out + j * 2 * N, a0[j]);
        storev(out + j * 2 * N + N, a1[j]);
    }
}

// pre[r * kTile + j] for the P packed rows of one block and fc <= kTile features.
template <typename T, typename WT>
void packed_tile(const T* Hp, const WT* W, int64_t fc, int64_t d, T* outT, T* pre) {
    constexpr int P = packed_rows<T>();
    int64_t j = 0;
    for (; j + 8 <= fc; j += 8) outer_block<8>(Hp, W + j * d, d, outT + j * P);
    for (; j < fc; ++j) outer_block<1>(Hp, W + j * d, d, outT + j * P);
    for (int64_t jj = 0; jj < fc; ++jj)
        for (int r = 0; r < P; ++r) pre[r * kTile + jj] = outT[jj * P + r];
}

// g += Σ_i s[i] · W[js[i]] over n <= 4 rows of W (one read-modify-write of g).
template <typename T, typename WT>
inline void axpy_rows(T* g, const WT* W, const int64_t* js, const T* s, int n, int64_t d) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    const WT* w[4];
    for (int i = 0; i < n; ++i) w[i] = W + js[i] * d;
    int64_t t = 0;
    if (n == 4) {
        for (; t + N <= d; t += N)
            storev(g + t, loadv(g + t) + s[0] * loadw(w[0] + t) + s[1] * loadw(w[1] + t) + s[2] * loadw(w[2] + t) +
                              s[3] * loadw(w[3] + t));
    } else {
        for (; t + N <= d; t += N) {
            V a = loadv(g + t);
            for (int i = 0; i < n; ++i) a += s[i] * loadw(w[i] + t);
            storev(g + t, a);
        }
    }
    for (; t < d; ++t)
        for (int i = 0; i < n; ++i) g[t] += s[i] * tof(w[i][t]);
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
    T s = 0;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

// Violations of one tile for rr rows: adds ReLU(pre + b) Φᵀ into vrows, returns the mask words.
// Optionally stores the features ReLU(pre + b) of the tile in feat.
template <typename T>
inline uint64_t accumulate_tile(const T* pre, const T* b, const T* PhiT, int64_t fc, int64_t K, T* vrow,
                                T* feat = nullptr) {
    uint64_t word = 0;
    for (int64_t j = 0; j < fc; ++j) {
        const T p = pre[j] + b[j];
        const bool on = !(p <= T(0));  // active, or NaN (propagates)
        if (feat) feat[j] = on ? p : T(0);
        if (on) {
            word |= uint64_t{1} << j;
            const T* pt = PhiT + j * K;
            for (int64_t k = 0; k < K; ++k) vrow[k] += p * pt[k];
        }
    }
    return word;
}

// Σ_i s_i W[j_i] over the active features of one row; s_j = c · Φ[:, j].
template <typename T, typename WT>
void row_vjp(const WT* W, const T* PhiT, const uint64_t* words, const T* c, T* g, int64_t d, int64_t F, int64_t K) {
    std::fill(g, g + d, T(0));
    int64_t js[4];
    T s[4];
    int n = 0;
    for (int64_t w = 0; w < mask_words(F); ++w) {
        uint64_t word = words[w];
        while (word) {
            const int64_t j = w * kTile + __builtin_ctzll(word);
            word &= word - 1;
            js[n] = j;
            s[n] = dot(c, PhiT + j * K, K);
            if (++n == 4) {
                axpy_rows(g, W, js, s, 4, d);
                n = 0;
            }
        }
    }
    if (n) axpy_rows(g, W, js, s, n, d);
}

// gH for kVjpRows consecutive rows, tile by tile (each 64-row tile of W stays in cache for every
// row block of the thread): acc[r] += G[r, j] · W[j] over one vector of d at a time.
constexpr int kVjpRows = 8;

template <typename T, typename WT>
void tile_vjp(const WT* W, const T* PhiT, const uint64_t* words, const T* C, T* g, int64_t w, int64_t d, int64_t F,
              int64_t K, T* G) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    const int64_t nw = mask_words(F), f0 = w * kTile;
    uint64_t any = 0;
    for (int r = 0; r < kVjpRows; ++r) any |= words[r * nw + w];
    if (!any) return;
    int64_t js[kTile];
    int n = 0;
    for (uint64_t u = any; u; u &= u - 1) {
        const int bit = __builtin_ctzll(u);
        for (int r = 0; r < kVjpRows; ++r)
            G[n * kVjpRows + r] = (words[r * nw + w] >> bit) & 1 ? dot(C + r * K, PhiT + (f0 + bit) * K, K) : T(0);
        js[n++] = f0 + bit;
    }
    int64_t t = 0;
    for (; t + N <= d; t += N) {
        V a[kVjpRows];
        for (int r = 0; r < kVjpRows; ++r) a[r] = loadv(g + r * d + t);
        for (int i = 0; i < n; ++i) {
            const V wv = loadw(W + js[i] * d + t);
            const T* gi = G + i * kVjpRows;
            for (int r = 0; r < kVjpRows; ++r) a[r] += gi[r] * wv;
        }
        for (int r = 0; r < kVjpRows; ++r) storev(g + r * d + t, a[r]);
    }
    for (; t < d; ++t)
        for (int i = 0; i < n; ++i)
            for (int r = 0; r < kVjpRows; ++r) g[r * d + t] += G[i * kVjpRows + r] * tof(W[js[i] * d + t]);
}

}  // namespace

template <typename T, typename WT>
void forward(const T* H, const WT* W, const T* b, const T* PhiT, const T* xi, T* V, uint64_t* mask, T* feat,
             int64_t B, int64_t d, int64_t F, int64_t K, int threads) {
    constexpr int P = packed_rows<T>();
    const int64_t nw = mask_words(F);
    const int64_t T_ = std::max<int64_t>(1, std::min<int64_t>(threads, nw));
    const bool packed = B >= P / 2;  // enough rows to fill the vectors of the outer-product form
    const std::vector<T> Hp = packed ? pack_rows(H, B, d) : std::vector<T>();
    // bfloat16 W with few rows: states rounded to bfloat16 once, native bfloat16 dot products
    constexpr bool bf16_dot = kNativeBf16 && std::is_same_v<WT, bf16> && std::is_same_v<T, float>;
    std::vector<uint16_t> Hb;
#if defined(__AVX512BF16__)
    if constexpr (bf16_dot)
        if (!packed) {
            Hb.resize(B * d);
            for (int64_t i = 0; i < B * d; ++i) Hb[i] = to_bf16(H[i]);
        }
#endif
    const int64_t R = packed ? P : kRows;
    std::vector<std::vector<T>> partial(T_, std::vector<T>(B * K, T(0)));
    // thread t owns the tiles [nw·t/T, nw·(t+1)/T) and accumulates into partial[t]
    parallel_for(T_, static_cast<int>(T_), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            T* Vp = partial[t].data();
            std::vector<T> pre(P * kTile), outT(P * kTile);
            for (int64_t w = nw * t / T_; w < nw * (t + 1) / T_; ++w) {
                const int64_t f0 = w * kTile, fc = std::min(kTile, F - f0);
                for (int64_t r0 = 0; r0 < B; r0 += R) {
                    const int64_t rr = std::min<int64_t>(R, B - r0);
                    if (packed) {
                        packed_tile(Hp.data() + (r0 / P) * d * P, W + f0 * d, fc, d, outT.data(), pre.data());
                    } else if (!Hb.empty()) {
#if defined(__AVX512BF16__)
                        if constexpr (bf16_dot)
                            for (int64_t r = 0; r < rr; ++r)
                                pre_tile_bf16(Hb.data() + (r0 + r) * d, W + f0 * d, fc, d, pre.data() + r * kTile);
#endif
                    } else {
                        const T* hrows[kRows];
                        for (int64_t r = 0; r < rr; ++r) hrows[r] = H + (r0 + r) * d;
                        pre_tile(hrows, rr, W + f0 * d, fc, d, pre.data());
                    }
                    for (int64_t r = 0; r < rr; ++r) {
                        const uint64_t word = accumulate_tile(pre.data() + r * kTile, b + f0, PhiT + f0 * K, fc, K,
                                                              Vp + (r0 + r) * K, feat ? feat + (r0 + r) * F + f0 : nullptr);
                        if (mask) mask[(r0 + r) * nw + w] = word;
                    }
                }
            }
        }
    });
    for (int64_t i = 0; i < B; ++i)
        for (int64_t k = 0; k < K; ++k) {
            T s = partial[0][i * K + k];
            for (int64_t t = 1; t < T_; ++t) s += partial[t][i * K + k];
            V[i * K + k] = s - xi[k];
        }
}

template <typename T, typename WT>
void vjp_input(const WT* W, const T* PhiT, const uint64_t* mask, const T* C, const T* V, T* gH, int64_t B, int64_t d,
               int64_t F, int64_t K, int threads) {
    const int64_t nw = mask_words(F);
    const int64_t nb = B / kVjpRows;  // full blocks go tile by tile; the remaining rows one by one
    parallel_for(nb + (B - nb * kVjpRows), threads, [&](int64_t i0, int64_t i1) {
        std::vector<T> G(kTile * kVjpRows);
        const int64_t b1 = std::min(i1, nb);
        for (int64_t rb = i0; rb < b1; ++rb) std::fill(gH + rb * kVjpRows * d, gH + (rb + 1) * kVjpRows * d, T(0));
        for (int64_t w = 0; w < nw; ++w)
            for (int64_t rb = i0; rb < b1; ++rb)
                tile_vjp(W, PhiT, mask + rb * kVjpRows * nw, C + rb * kVjpRows * K, gH + rb * kVjpRows * d, w, d, F,
                         K, G.data());
        for (int64_t i = std::max(i0, nb); i < i1; ++i) {
            const int64_t r = nb * kVjpRows + (i - nb);
            row_vjp(W, PhiT, mask + r * nw, C + r * K, gH + r * d, d, F, K);
        }
    });
    for (int64_t r = 0; V && r < B; ++r) {
        bool nan = false;
        for (int64_t k = 0; k < K; ++k) nan = nan || std::isnan(V[r * K + k]);
        if (nan) std::fill(gH + r * d, gH + (r + 1) * d, std::numeric_limits<T>::quiet_NaN());
    }
}

template <typename T>
void param_grads(const T* H, const T* W, const T* b, const T* PhiT, const uint64_t* mask, const T* feat, const T* C,
                 T* gW, T* gb, T* gPhiT, int64_t B, int64_t d, int64_t F, int64_t K, int threads) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    constexpr int JB = 8;
    const int64_t nw = mask_words(F);
    parallel_for(nw, threads, [&](int64_t w0, int64_t w1) {
        std::vector<int64_t> rows;
        std::vector<uint64_t> words;
        std::vector<T> G, pre(kRows * kTile), gphi(kTile * K);
        for (int64_t w = w0; w < w1; ++w) {
            const int64_t f0 = w * kTile, fc = std::min(kTile, F - f0);
            rows.clear();
            words.clear();
            for (int64_t r = 0; r < B; ++r)
                if (mask[r * nw + w]) {
                    rows.push_back(r);
                    words.push_back(mask[r * nw + w]);
                }
            const int64_t nr = static_cast<int64_t>(rows.size());
            G.assign(nr * kTile, T(0));  // G[i, j] = (C Φ)[rows[i], f0 + j] where active, else 0
            std::fill(gphi.begin(), gphi.end(), T(0));
            for (int64_t i0 = 0; i0 < nr; i0 += kRows) {
                const int64_t rr = std::min<int64_t>(kRows, nr - i0);
                if (gPhiT && !feat) {  // recompute the active features of these rows for ∂Φ = Cᵀ ReLU(H Wᵀ + b)
                    const T* hrows[kRows];
                    for (int64_t r = 0; r < rr; ++r) hrows[r] = H + rows[i0 + r] * d;
                    pre_tile(hrows, rr, W + f0 * d, fc, d, pre.data());
                }
                for (int64_t r = 0; r < rr; ++r) {
                    const int64_t i = i0 + r;
                    const T* c = C + rows[i] * K;
                    uint64_t word = words[i];
                    while (word) {
                        const int64_t j = __builtin_ctzll(word);
                        word &= word - 1;
                        G[i * kTile + j] = dot(c, PhiT + (f0 + j) * K, K);
                        if (gPhiT) {
                            const T f = feat ? feat[rows[i] * F + f0 + j] : pre[r * kTile + j] + b[f0 + j];
                            for (int64_t k = 0; k < K; ++k) gphi[j * K + k] += c[k] * f;
                        }
                    }
                }
            }
            if (gPhiT) std::copy(gphi.begin(), gphi.begin() + fc * K, gPhiT + f0 * K);
            if (gb)
                for (int64_t j = 0; j < fc; ++j) {
                    T s = 0;
                    for (int64_t i = 0; i < nr; ++i) s += G[i * kTile + j];
                    gb[f0 + j] = s;
                }
            if (!gW) continue;
            // gW[f0 + j] = Σ_i G[i, j] H[rows[i]]: blocks of JB features × one vector of d
            for (int64_t j0 = 0; j0 < fc; j0 += JB) {
                const int64_t jb = std::min<int64_t>(JB, fc - j0);
                int64_t t = 0;
                for (; t + N <= d; t += N) {
                    V acc[JB];
                    for (int j = 0; j < JB; ++j) acc[j] = V{};
                    for (int64_t i = 0; i < nr; ++i) {
                        const T* g = G.data() + i * kTile + j0;
                        const V h = loadv(H + rows[i] * d + t);
                        if (jb == JB) {
                            for (int j = 0; j < JB; ++j) acc[j] += g[j] * h;
                        } else {
                            for (int64_t j = 0; j < jb; ++j) acc[j] += g[j] * h;
                        }
                    }
                    for (int64_t j = 0; j < jb; ++j) storev(gW + (f0 + j0 + j) * d + t, acc[j]);
                }
                for (; t < d; ++t)
                    for (int64_t j = 0; j < jb; ++j) {
                        T s = 0;
                        for (int64_t i = 0; i < nr; ++i) s += G[i * kTile + j0 + j] * H[rows[i] * d + t];
                        gW[(f0 + j0 + j) * d + t] = s;
                    }
            }
        }
    });
}

// The Jacobian of one row over its n active features js: A [K, d] = Σ_i Φ[:, js[i]] W[js[i]], in strips
// of S vectors of d, kJacK facets at a time held in registers while the active rows of W stream past
// (each strip of W_j is read ceil(K / kJacK) times, from cache; the strip of a later row is
// prefetched). Every entry sums over the features in the order of js.
constexpr int kJacK = 7;

template <int KB, int S, typename T, typename WT>
inline void jacobian_strip(const WT* W, const T* PhiT, const int64_t* js, int64_t n, int64_t K, int64_t k0, int64_t t,
                           int64_t d, T* A) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    constexpr int64_t ahead = 8;
    V acc[KB][S];
    for (int k = 0; k < KB; ++k)
        for (int q = 0; q < S; ++q) acc[k][q] = V{};
    for (int64_t i = 0; i < n; ++i) {
        const WT* w = W + js[i] * d + t;
        if (i + ahead < n)
            for (int q = 0; q < S; ++q) __builtin_prefetch(W + js[i + ahead] * d + t + q * N);
        V wv[S];
        for (int q = 0; q < S; ++q) wv[q] = loadw(w + q * N);
        const T* s = PhiT + js[i] * K + k0;
        for (int k = 0; k < KB; ++k)
            for (int q = 0; q < S; ++q) acc[k][q] += s[k] * wv[q];
    }
    for (int k = 0; k < KB; ++k)
        for (int q = 0; q < S; ++q) storev(A + (k0 + k) * d + t + q * N, acc[k][q]);
}

template <int S, typename T, typename WT>
inline void jacobian_strips(const WT* W, const T* PhiT, const int64_t* js, int64_t n, int64_t K, int64_t t,
                            int64_t d, T* A) {
    int64_t k0 = 0;
    for (; k0 + kJacK <= K; k0 += kJacK) jacobian_strip<kJacK, S>(W, PhiT, js, n, K, k0, t, d, A);
    switch (K - k0) {
        case 1: jacobian_strip<1, S>(W, PhiT, js, n, K, k0, t, d, A); break;
        case 2: jacobian_strip<2, S>(W, PhiT, js, n, K, k0, t, d, A); break;
        case 3: jacobian_strip<3, S>(W, PhiT, js, n, K, k0, t, d, A); break;
        case 4: jacobian_strip<4, S>(W, PhiT, js, n, K, k0, t, d, A); break;
        case 5: jacobian_strip<5, S>(W, PhiT, js, n, K, k0, t, d, A); break;
        case 6: jacobian_strip<6, S>(W, PhiT, js, n, K, k0, t, d, A); break;
        default: break;
    }
}

template <typename T, typename WT>
void jacobian(const WT* W, const T* b, const T* PhiT, const T* xi, const uint64_t* mask, T* A, T* c, int64_t B,
              int64_t d, int64_t F, int64_t K, int threads) {
    constexpr int N = Vec<T>::N;
    const int64_t nw = mask_words(F);
    parallel_for(B, threads, [&](int64_t r0, int64_t r1) {
        std::vector<int64_t> js;
        for (int64_t r = r0; r < r1; ++r) {
            T* Ar = A + r * K * d;
            T* cr = c + r * K;
            std::copy(xi, xi + K, cr);
            js.clear();
            for (int64_t w = 0; w < nw; ++w) {
                uint64_t word = mask[r * nw + w];
                while (word) {
                    const int64_t j = w * kTile + __builtin_ctzll(word);
                    word &= word - 1;
                    for (int64_t k = 0; k < K; ++k) cr[k] -= PhiT[j * K + k] * b[j];
                    js.push_back(j);
                }
            }
            const int64_t n = static_cast<int64_t>(js.size());
            int64_t t = 0;
            for (; t + 2 * N <= d; t += 2 * N) jacobian_strips<2>(W, PhiT, js.data(), n, K, t, d, Ar);
            for (; t + N <= d; t += N) jacobian_strips<1>(W, PhiT, js.data(), n, K, t, d, Ar);
            for (; t < d; ++t)  // the last d mod N columns
                for (int64_t k = 0; k < K; ++k) {
                    T a = 0;
                    for (int64_t i = 0; i < n; ++i) a += PhiT[js[i] * K + k] * tof(W[js[i] * d + t]);
                    Ar[k * d + t] = a;
                }
        }
    });
}

// out[i] = g[i] P for R rows g[i] [m] and P [m, n] (R <= 4 per block): S vectors of columns of each
// out[i] at a time held in registers while P streams past once for the R rows; each out[i][u] sums
// g[i][s] P[s, u] in the order of s.
template <int R, int S, typename T>
inline void rows_times_block(const T* const* g, const T* P, T* const* out, int64_t m, int64_t n, int64_t u0) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    V acc[R][S];
    for (int i = 0; i < R; ++i)
        for (int q = 0; q < S; ++q) acc[i][q] = V{};
    for (int64_t s = 0; s < m; ++s)
        for (int q = 0; q < S; ++q) {
            const V pv = loadv(P + s * n + u0 + q * N);
            for (int i = 0; i < R; ++i) acc[i][q] += g[i][s] * pv;
        }
    for (int i = 0; i < R; ++i)
        for (int q = 0; q < S; ++q) storev(out[i] + u0 + q * N, acc[i][q]);
}

template <int R, typename T>
void rows_times_columns(const T* const* g, const T* P, T* const* out, int64_t m, int64_t n) {
    constexpr int N = Vec<T>::N;
    int64_t u = 0;
    for (; u + 4 * N <= n; u += 4 * N) rows_times_block<R, 4>(g, P, out, m, n, u);
    for (; u + N <= n; u += N) rows_times_block<R, 1>(g, P, out, m, n, u);
    for (; u < n; ++u)  // the last n mod N columns
        for (int i = 0; i < R; ++i) {
            T a = 0;
            for (int64_t s = 0; s < m; ++s) a += g[i][s] * P[s * n + u];
            out[i][u] = a;
        }
}

template <typename T>
void rows_times_matrix(const std::vector<const T*>& g, const T* P, const std::vector<T*>& out, int64_t m, int64_t n) {
    const int64_t R = static_cast<int64_t>(g.size());
    int64_t i = 0;
    for (; i + 4 <= R; i += 4) rows_times_columns<4>(g.data() + i, P, out.data() + i, m, n);
    switch (R - i) {
        case 1: rows_times_columns<1>(g.data() + i, P, out.data() + i, m, n); break;
        case 2: rows_times_columns<2>(g.data() + i, P, out.data() + i, m, n); break;
        case 3: rows_times_columns<3>(g.data() + i, P, out.data() + i, m, n); break;
        default: break;
    }
}

// One row of the SafeFlow loop in progress.
template <typename T>
struct LoopRow {
    std::vector<T> pref, xref, v, c, g, gp, delta, a, along;
    std::vector<uint64_t> words;
    std::vector<int64_t> cand;
    T refnorm = 0, dist = 0, anorm = 0;
    int64_t steps = 0;
    bool fresh = true, live = true;

    LoopRow(int64_t F, int64_t d, int64_t K, int64_t r)
        : pref(F), xref(d), v(K), c(K), g(d), gp(d), delta(d), a(r), along(r ? F : 0), words(mask_words(F)) {}
};

template <typename T, typename WT>
void safeflow_loop(const T* h, const WT* W, const T* b, const T* PhiT, const T* xi, const T* P, LoopBound<T> bound,
                   T* x, int64_t* steps, int64_t M, int64_t d, int64_t F, int64_t K, LoopConfig cfg, int threads) {
    const T lr = static_cast<T>(cfg.lr), ls = static_cast<T>(cfg.lambda_safe), lu = static_cast<T>(cfg.lambda_unsafe);
    const T neg_margin = static_cast<T>(-cfg.margin), inv_d = T(1) / static_cast<T>(d);
    // rounding bound of a dot product of length d (or r <= d), with slack: |fl(w·x) − w·x| <= gamma ‖w‖ ‖x‖
    const T gamma = T(2) * static_cast<T>(d) * std::numeric_limits<T>::epsilon();
    const int64_t nw = mask_words(F), r = bound.rank;
    const T root_r = std::sqrt(static_cast<T>(r));
    const T* wnorm = bound.wnorm;
    // Each row keeps the pre-activations p_ref = W x_ref + b of its last full pass. With
    // δ = x − x_ref written as δ = Uᵀa + e (a = U δ [r], e the rest),
    // |p_j(x) − p_ref,j| = |(W Uᵀ)_j · a + W_j · e| <= |(W Uᵀ)_j · a| + ‖W_j‖ ‖e‖, so a feature with
    // p_ref,j + |(W Uᵀ)_j · a| + ‖W_j‖ ‖e‖ (+ rounding) < 0 is inactive at x and is skipped; the
    // others are recomputed exactly. No basis (r = 0): e = δ, the Cauchy–Schwarz bound. The steps
    // x ← x − lr·g P mostly move along the leading eigenvectors of P, so a basis of those leaves a
    // small ‖e‖ and skips most features for many steps. The result is the full computation's, at a
    // fraction of the reads of W.
    // Rows go in groups of up to kLoopGroup in lockstep, step by step, so that the products with
    // U Wᵀ [r, F] and P [d, d] (larger than the L2 cache) stream them once for the whole group.
    constexpr int64_t kLoopGroup = 8;
    parallel_for(M, threads, [&](int64_t r0, int64_t r1) {
        std::vector<T> pre(kRows * kTile), top(F);
        std::vector<LoopRow<T>> group;
        std::vector<const T*> lhs;
        std::vector<T*> outs;
        for (int64_t g0 = r0; g0 < r1; g0 += kLoopGroup) {
            const int64_t ng = std::min(kLoopGroup, r1 - g0);
            while (static_cast<int64_t>(group.size()) < ng) group.emplace_back(F, d, K, r);
            for (int64_t q = 0; q < ng; ++q) {
                LoopRow<T>& s = group[q];
                std::copy(h + (g0 + q) * d, h + (g0 + q + 1) * d, x + (g0 + q) * d);
                s.refnorm = 0;
                s.fresh = s.live = true;
                s.steps = cfg.max_steps;
            }
            for (int64_t n = 0; n < cfg.max_steps; ++n) {
                // 1. each live row after its first pass: δ = x − x_ref, a = U δ, then δ ← e = δ − Uᵀ a
                lhs.clear();
                outs.clear();
                for (int64_t q = 0; q < ng; ++q) {
                    LoopRow<T>& s = group[q];
                    if (!s.live || s.fresh) continue;
                    const T* xr = x + (g0 + q) * d;
                    for (int64_t t = 0; t < d; ++t) s.delta[t] = xr[t] - s.xref[t];
                    s.dist = std::sqrt(dot(s.delta.data(), s.delta.data(), d));
                    s.anorm = 0;
                    if (r) {
                        const T* drow[1] = {s.delta.data()};
                        pre_tile(drow, 1, bound.basis, r, d, s.a.data());
                        s.anorm = std::sqrt(dot(s.a.data(), s.a.data(), r));
                        int64_t ks[4];
                        T na[4];
                        for (int64_t k0 = 0; k0 < r; k0 += 4) {
                            const int cnt = static_cast<int>(std::min<int64_t>(4, r - k0));
                            for (int i = 0; i < cnt; ++i) ks[i] = k0 + i, na[i] = -s.a[k0 + i];
                            axpy_rows(s.delta.data(), bound.basis, ks, na, cnt, d);
                        }
                        lhs.push_back(s.a.data());
                        outs.push_back(s.along.data());
                    }
                }
                // 2. along = (W Uᵀ) a = a (U Wᵀ) for those rows at once
                if (!lhs.empty()) rows_times_matrix(lhs, bound.basis_WT, outs, r, F);
                // 3. each live row: the violations at x (skipping features proven inactive), stop or take the
                //    gradient
                lhs.clear();
                outs.clear();
                for (int64_t q = 0; q < ng; ++q) {
                    LoopRow<T>& s = group[q];
                    if (!s.live) continue;
                    const T* h0 = h + (g0 + q) * d;
                    T* xr = x + (g0 + q) * d;
                    std::fill(s.words.begin(), s.words.end(), uint64_t{0});
                    std::fill(s.v.begin(), s.v.end(), T(0));
                    auto activate = [&](int64_t j, T p) {
                        if (p <= T(0)) return;  // NaN counts as active
                        s.words[j / kTile] |= uint64_t{1} << (j % kTile);
                        const T* pt = PhiT + j * K;
                        for (int64_t k = 0; k < K; ++k) s.v[k] += p * pt[k];
                    };
                    bool full = s.fresh;
                    if (!full) {
                        const T enorm = r ? std::sqrt(dot(s.delta.data(), s.delta.data(), d)) : s.dist;
                        // rounding: of the full pass (2 refnorm + dist), of δ and e (dist, root_r·anorm), of W Uᵀ
                        // and of its dot with a (root_r·anorm), of ‖W_j‖ ‖e‖ (enorm)
                        const T slack = T(2) * s.refnorm + T(3) * s.dist + T(3) * root_r * s.anorm + enorm;
                        full = !std::isfinite(slack);
                        if (!full) {
                            // the bound of every feature (one vectorised pass), then the candidates
                            for (int64_t j = 0; j < F; ++j) {
                                const T reach = (r ? std::abs(s.along[j]) : T(0)) + wnorm[j] * enorm;
                                top[j] = s.pref[j] + reach + gamma * (wnorm[j] * slack + T(2) * std::abs(b[j]));
                            }
                            s.cand.clear();
                            for (int64_t j = 0; j < F; ++j)
                                if (!(top[j] < T(0))) s.cand.push_back(j);
                            full = static_cast<int64_t>(s.cand.size()) * 4 > F;
                        }
                    }
                    if (full) {
                        const T* hrows[1] = {xr};
                        for (int64_t w = 0; w < nw; ++w) {
                            const int64_t f0 = w * kTile, fc = std::min(kTile, F - f0);
                            pre_tile(hrows, 1, W + f0 * d, fc, d, pre.data());
                            for (int64_t jj = 0; jj < fc; ++jj) s.pref[f0 + jj] = pre[jj] + b[f0 + jj];
                        }
                        std::copy(xr, xr + d, s.xref.begin());
                        s.refnorm = std::sqrt(dot(xr, xr, d));
                        s.fresh = false;
                        for (int64_t j = 0; j < F; ++j) activate(j, s.pref[j]);
                    } else {  // the candidates, eight rows of W at a time
                        constexpr int G = 8;
                        const int64_t nc = static_cast<int64_t>(s.cand.size());
                        const WT* w[G];
                        T p[G];
                        int64_t i = 0;
                        for (; i + G <= nc; i += G) {
                            for (int u = 0; u < G; ++u) w[u] = W + s.cand[i + u] * d;
                            gathered_dots<G>(xr, w, d, p);
                            for (int u = 0; u < G; ++u) activate(s.cand[i + u], p[u] + b[s.cand[i + u]]);
                        }
                        for (; i < nc; ++i) {
                            w[0] = W + s.cand[i] * d;
                            gathered_dots<1>(xr, w, d, p);
                            activate(s.cand[i], p[0] + b[s.cand[i]]);
                        }
                    }
                    bool finite = true;
                    T vmax = -std::numeric_limits<T>::infinity();
                    for (int64_t k = 0; k < K; ++k) {
                        s.v[k] -= xi[k];
                        finite = finite && std::isfinite(s.v[k]);
                        vmax = std::max(vmax, s.v[k]);
                    }
                    if (!finite || !(vmax > neg_margin)) {
                        s.live = false;
                        s.steps = n;
                        continue;
                    }
                    for (int64_t k = 0; k < K; ++k) s.c[k] = ls + lu * static_cast<T>(s.v[k] > neg_margin);
                    row_vjp(W, PhiT, s.words.data(), s.c.data(), s.g.data(), d, F, K);
                    for (int64_t t = 0; t < d; ++t) {
                        const T diff = xr[t] - h0[t];
                        s.g[t] += static_cast<T>((diff > 0) - (diff < 0)) * inv_d;
                    }
                    lhs.push_back(s.g.data());
                    outs.push_back(s.gp.data());
                }
                if (lhs.empty()) break;
                // 4. the steps x ← x − lr·g P, with g P for every live row at once
                if (P) rows_times_matrix(lhs, P, outs, d, d);
                for (int64_t q = 0; q < ng; ++q) {
                    LoopRow<T>& s = group[q];
                    if (!s.live) continue;
                    const T* step = P ? s.gp.data() : s.g.data();
                    T* xr = x + (g0 + q) * d;
                    for (int64_t t = 0; t < d; ++t) xr[t] -= lr * step[t];
                }
            }
            for (int64_t q = 0; q < ng; ++q) steps[g0 + q] = group[q].steps;
        }
    });
}

#define SAFEFLOW_INSTANTIATE(T, WT)                                                                                   \
    template void forward<T, WT>(const T*, const WT*, const T*, const T*, const T*, T*, uint64_t*, T*, int64_t,      \
                                 int64_t, int64_t, int64_t, int);                                                     \
    template void vjp_input<T, WT>(const WT*, const T*, const uint64_t*, const T*, const T*, T*, int64_t, int64_t,    \
                                   int64_t, int64_t, int);                                                                   \
    template void jacobian<T, WT>(const WT*, const T*, const T*, const T*, const uint64_t*, T*, T*, int64_t, int64_t, \
                                  int64_t, int64_t, int);                                                             \
    template void safeflow_loop<T, WT>(const T*, const WT*, const T*, const T*, const T*, const T*, LoopBound<T>,     \
                                       T*, int64_t*, int64_t, int64_t, int64_t, int64_t, LoopConfig, int);

SAFEFLOW_INSTANTIATE(float, float)
SAFEFLOW_INSTANTIATE(double, double)
SAFEFLOW_INSTANTIATE(float, bf16)
template void param_grads<float>(const float*, const float*, const float*, const float*, const uint64_t*,
                                 const float*, const float*, float*, float*, float*, int64_t, int64_t, int64_t, int64_t,
                                 int);
template void param_grads<double>(const double*, const double*, const double*, const double*, const uint64_t*,
                                  const double*, const double*, double*, double*, double*, int64_t, int64_t, int64_t,
                                  int64_t, int);

}  // namespace safeflow
