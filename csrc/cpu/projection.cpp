// The projection steerer on the CPU (see projection_cpu.h and safeflow/steerers/projection.py).
//
// Each row is independent; threads split the rows, and each thread takes its rows in groups that
// advance round by round together, so that a round reads W once for the whole group. Per round a
// row needs W·step (and W·base after a short segment): the pre-activations along the segment
// base + t·step are affine in t, p_j(t) = p_j(base) + t·(W_j·step), so a feature whose upper bound
// p_j(base) + max(0, W_j·step) (+ a rounding allowance) is negative stays inactive on the whole
// segment and is skipped. Every point of the bisection is then judged by its violations from p_j(t)
// over the remaining candidate features: the same function of t as evaluating W at base + t·step
// (no reads of W), rounded differently. The slack the rounds aim deeper by (1e-4 of the
// violations' scale) dwarfs that rounding, and the caller recomputes the violations of the rows it
// returns (the certificate).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#include "polytope_cpu.h"
#include "projection_cpu.h"

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

template <typename T>
inline typename Vec<T>::type loadv(const T* p) {
    typename Vec<T>::type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
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

// out[r * J + q] = rows[r] · w[q] for R state rows and J rows of W (one read of each W row). The
// rows of W are consecutive: the same columns of the J rows after them are prefetched (from L3).
template <int R, int J, typename T, typename WT>
inline void dots(const T* const* rows, const WT* const* w, int64_t d, T* out) {
    using V = typename Vec<T>::type;
    constexpr int N = Vec<T>::N;
    V acc[R][J];
    for (int r = 0; r < R; ++r)
        for (int q = 0; q < J; ++q) acc[r][q] = V{};
    int64_t t = 0;
    for (; t + N <= d; t += N) {
        V x[R];
        for (int r = 0; r < R; ++r) x[r] = loadv(rows[r] + t);
        for (int q = 0; q < J; ++q) {
            __builtin_prefetch(w[q] + J * d + t);  // never faults, past the end of W included
            const V wv = loadw(w[q] + t);
            for (int r = 0; r < R; ++r) acc[r][q] += x[r] * wv;
        }
    }
    for (int r = 0; r < R; ++r)
        for (int q = 0; q < J; ++q) {
            T s = 0;
            for (int i = 0; i < N; ++i) s += acc[r][q][i];
            for (int64_t u = t; u < d; ++u) s += rows[r][u] * tof(w[q][u]);
            out[r * J + q] = s;
        }
}

// out[r][j] = rows[r] · W[j] for R rows and the first n rows of W.
template <int R, typename T, typename WT>
void pre_rows(const WT* W, int64_t n, const T* const* rows, int64_t d, T* const* out) {
    constexpr int J = 4;
    const WT* w[J];
    T o[R * J];
    int64_t i = 0;
    for (; i + J <= n; i += J) {
        for (int q = 0; q < J; ++q) w[q] = W + (i + q) * d;
        dots<R, J>(rows, w, d, o);
        for (int r = 0; r < R; ++r)
            for (int q = 0; q < J; ++q) out[r][i + q] = o[r * J + q];
    }
    for (; i < n; ++i) {
        w[0] = W + i * d;
        dots<R, 1>(rows, w, d, o);
        for (int r = 0; r < R; ++r) out[r][i] = o[r];
    }
}

inline double dotd(const double* a, const double* b, int64_t n) {
    using V = Vec<double>::type;
    constexpr int N = Vec<double>::N;
    V acc0 = V{}, acc1 = V{};
    int64_t t = 0;
    for (; t + 2 * N <= n; t += 2 * N) {
        acc0 += loadv(a + t) * loadv(b + t);
        acc1 += loadv(a + t + N) * loadv(b + t + N);
    }
    acc0 += acc1;
    double s = 0;
    for (int i = 0; i < N; ++i) s += acc0[i];
    for (; t < n; ++t) s += a[t] * b[t];
    return s;
}

// max over v (NaN if any entry is NaN, as torch.amax)
template <typename T>
inline T nanmax(const T* v, int64_t n) {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < n; ++i) {
        if (std::isnan(v[i])) return v[i];
        m = std::max(m, v[i]);
    }
    return m;
}

// --- the dual QP (safeflow/steerers/dual_qp.py), one row, float64 ---------------------------
struct Qp {
    int64_t K = 0;
    std::vector<double> Q, r, z, w, lam, L, y, ratio;
    std::vector<int64_t> order;  // the free set in the order of the rows of the Cholesky factor L
    std::vector<char> free, next;
    bool valid = false;  // L factors Q over the current free set

    explicit Qp(int64_t K_) : K(K_), Q(K_ * K_), r(K_), z(K_), w(K_), lam(K_), L(K_ * K_), y(K_), ratio(K_),
                              free(K_), next(K_) {}

    // Appends row k to the Cholesky factor of Q over `order`; false if Q stops being positive definite.
    bool append(int64_t k) {
        const int64_t i = static_cast<int64_t>(order.size());
        order.push_back(k);
        double diag = Q[k * K + k];
        for (int64_t j = 0; j < i; ++j) {
            double s = Q[k * K + order[j]];
            for (int64_t q = 0; q < j; ++q) s -= L[i * K + q] * L[j * K + q];
            L[i * K + j] = s / L[j * K + j];
            diag -= L[i * K + j] * L[i * K + j];
        }
        if (!(diag > 0)) return false;  // not positive definite (or NaN), as LAPACK's potrf
        L[i * K + i] = std::sqrt(diag);
        return true;
    }

    // z with Q_FF z_F = r_F and z = 0 off the free set F; false if Q_FF is not positive definite.
    // The factor is extended by one row when F grew by `added` since the last call, else rebuilt.
    bool solve_on(int64_t added = -1) {
        valid = valid && added >= 0;
        if (valid) {
            valid = append(added);
        } else {
            order.clear();
            valid = true;
            for (int64_t k = 0; k < K && valid; ++k)
                if (free[k]) valid = append(k);
        }
        if (!valid) return false;
        const int64_t nf = static_cast<int64_t>(order.size());
        std::fill(z.begin(), z.end(), 0.0);
        for (int64_t i = 0; i < nf; ++i) {
            double s = r[order[i]];
            for (int64_t q = 0; q < i; ++q) s -= L[i * K + q] * y[q];
            y[i] = s / L[i * K + i];
        }
        for (int64_t i = nf - 1; i >= 0; --i) {
            double s = y[i];
            for (int64_t q = i + 1; q < nf; ++q) s -= L[q * K + i] * z[order[q]];
            z[order[i]] = s / L[i * K + i];
        }
        return true;
    }

    void residual(const std::vector<double>& x) {  // w = r − Q x
        for (int64_t i = 0; i < K; ++i) w[i] = r[i] - dotd(Q.data() + i * K, x.data(), K);
    }

    // active_set(): primal–dual active-set steps, then Lawson–Hanson; λ in lam, true if solved.
    bool active_set(int64_t pdas_steps = 8) {
        double rmax = 0;
        for (int64_t k = 0; k < K; ++k) rmax = std::max(rmax, std::abs(r[k]));
        const double tol = 1e-12 * (rmax + 1e-300);
        for (int64_t k = 0; k < K; ++k) free[k] = r[k] > tol;
        bool factored = false, same = false;
        for (int64_t i = 0; i <= pdas_steps; ++i) {
            valid = false;
            factored = solve_on();
            residual(z);
            same = true;
            for (int64_t k = 0; k < K; ++k) {
                next[k] = factored && (free[k] ? z[k] > 0 : w[k] > tol);
                same = same && next[k] == free[k];
            }
            if (i == pdas_steps || same) break;
            std::copy(next.begin(), next.end(), free.begin());
        }
        if (factored && same) {
            lam = z;
            return true;
        }
        std::fill(lam.begin(), lam.end(), 0.0);
        valid = false;
        bool adding = false;  // lam solves its free set: a constraint may join
        for (int64_t it = 0, max_iter = 3 * K + 20; it < max_iter; ++it) {
            residual(lam);
            int64_t best = 0;
            double best_w = free[0] ? -std::numeric_limits<double>::infinity() : w[0];
            for (int64_t k = 1; k < K; ++k) {
                const double cand = free[k] ? -std::numeric_limits<double>::infinity() : w[k];
                if (cand > best_w) best_w = cand, best = k;
            }
            if (adding && !(best_w > tol)) return true;  // KKT holds
            if (adding) free[best] = 1;
            if (!solve_on(adding ? best : -1)) return false;
            bool accept = true;
            double alpha = std::numeric_limits<double>::infinity();
            for (int64_t k = 0; k < K; ++k) {
                const bool neg = free[k] && z[k] <= 0;
                accept = accept && !neg;
                ratio[k] = neg ? lam[k] / std::max(lam[k] - z[k], 1e-300) : std::numeric_limits<double>::infinity();
                alpha = std::min(alpha, ratio[k]);
            }
            alpha = std::min(std::max(alpha, 0.0), 1.0);
            for (int64_t k = 0; k < K; ++k) {
                const bool neg = free[k] && z[k] <= 0;
                lam[k] = accept ? z[k] : lam[k] + alpha * (z[k] - lam[k]);
                if (!accept && ((neg && ratio[k] <= alpha) || (free[k] && lam[k] <= 0))) {
                    free[k] = 0;
                    lam[k] = 0.0;
                    valid = false;
                }
            }
            adding = accept;
        }
        return false;
    }
};

// out [K, d] = A [K, d] · M [d, d]: blocks of 2 rows of A × 4 vectors of columns of M in registers.
template <int KR>
inline void times_block(const double* A, const double* M, double* out, int64_t d, int64_t s0) {
    using V = Vec<double>::type;
    constexpr int N = Vec<double>::N;
    V acc[KR][4];
    for (int k = 0; k < KR; ++k)
        for (int q = 0; q < 4; ++q) acc[k][q] = V{};
    for (int64_t t = 0; t < d; ++t) {
        V mv[4];
        for (int q = 0; q < 4; ++q) mv[q] = loadv(M + t * d + s0 + q * N);
        for (int k = 0; k < KR; ++k) {
            const double a = A[k * d + t];
            for (int q = 0; q < 4; ++q) acc[k][q] += a * mv[q];
        }
    }
    for (int k = 0; k < KR; ++k)
        for (int q = 0; q < 4; ++q) std::memcpy(out + k * d + s0 + q * N, &acc[k][q], sizeof(V));
}

void times_matrix(const double* A, const double* M, double* out, int64_t K, int64_t d) {
    constexpr int64_t S = 4 * Vec<double>::N;
    int64_t s0 = 0;
    for (; s0 + S <= d; s0 += S) {
        int64_t k = 0;
        for (; k + 2 <= K; k += 2) times_block<2>(A + k * d, M, out + k * d, d, s0);
        if (k < K) times_block<1>(A + k * d, M, out + k * d, d, s0);
    }
    for (int64_t k = 0; k < K; ++k)  // the last d mod S columns
        for (int64_t s = s0; s < d; ++s) {
            double acc = 0;
            for (int64_t t = 0; t < d; ++t) acc += A[k * d + t] * M[t * d + s];
            out[k * d + s] = acc;
        }
}

// Work space of one projection: the products with A and the dual.
struct ProjectWork {
    std::vector<double> MA, Q0;
    Qp qp;
    ProjectWork(int64_t K, int64_t d) : MA(K * d), Q0(K * K), qp(K) {}
};

// project() for one row with the rows MA [K, d] of A M given (MA = A for the identity metric);
// returns its status.
int64_t project_rows_of(const double* h, const double* A, const double* MA, const double* c, const double* mg,
                        double* hout, double* lam, ProjectWork& ws, int64_t d, int64_t K) {
    Qp& qp = ws.qp;
    double diag = 0;
    for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = i; j < K; ++j) ws.Q0[i * K + j] = ws.Q0[j * K + i] = dotd(A + i * d, MA + j * d, d);
        diag += ws.Q0[i * K + i];
        qp.r[i] = dotd(A + i * d, h, d) - c[i] + mg[i];
    }
    double ridge = 1e-10 * (diag / static_cast<double>(K));
    if (!(ridge > 0)) ridge = 1.0;  // A = 0: any ridge; infeasibility shows below
    bool finite = true, work = false;
    for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < K; ++j) {
            qp.Q[i * K + j] = ws.Q0[i * K + j] + (i == j ? ridge : 0.0);
            finite = finite && std::isfinite(qp.Q[i * K + j]);
        }
        finite = finite && std::isfinite(qp.r[i]);
        work = work || qp.r[i] > 0;
    }
    int64_t status = finite ? kOk : kNonfinite;
    std::fill(lam, lam + K, 0.0);
    if (finite && work) {  // r <= 0: λ = 0 is optimal, exactly
        bool ok = qp.active_set();
        for (int64_t k = 0; k < K; ++k) ok = ok && std::isfinite(qp.lam[k]);
        if (ok) std::copy(qp.lam.begin(), qp.lam.end(), lam);
        status = ok ? kOk : kSolverFailed;
    }
    if (status == kOk) {
        double res = -std::numeric_limits<double>::infinity(), rmax = 0, cmax = 0;
        for (int64_t i = 0; i < K; ++i) {
            res = std::max(res, qp.r[i] - dotd(ws.Q0.data() + i * K, lam, K));  // = A h* − c + m, must be <= 0
            rmax = std::max(rmax, std::abs(qp.r[i]));
            cmax = std::max(cmax, std::abs(c[i] - mg[i]));
        }
        if (!(res <= 1e-6 * (rmax + cmax))) status = kInfeasible;
    }
    if (status != kOk) {
        std::fill(lam, lam + K, 0.0);
        std::copy(h, h + d, hout);
        return status;
    }
    std::copy(h, h + d, hout);
    for (int64_t k = 0; k < K; ++k)
        if (lam[k] != 0)
            for (int64_t t = 0; t < d; ++t) hout[t] -= lam[k] * MA[k * d + t];
    return status;
}

// project() for one row (see projection_cpu.h); returns its status.
int64_t project_row(const double* h, const double* A, const double* c, const double* mg, const double* M,
                    double* hout, double* lam, ProjectWork& ws, int64_t d, int64_t K) {
    if (!M) return project_rows_of(h, A, A, c, mg, hout, lam, ws, d, K);
    times_matrix(A, M, ws.MA.data(), K, d);  // rows of A M (M symmetric: the rows of (M Aᵀ)ᵀ)
    return project_rows_of(h, A, ws.MA.data(), c, mg, hout, lam, ws, d, K);
}

// V [K] = Σ_j ReLU(p_j) Φ[:, j] − ξ over the features js (every other feature inactive), where
// p_j = pre(j) is feature j's pre-activation, bias included: returns max_k V_k (NaN-propagating)
// and lists the active features.
template <typename T, typename Pre>
T violations_over(const std::vector<int64_t>& js, Pre pre, const T* PhiT, const T* xi, int64_t K, T* V,
                  std::vector<int64_t>& active) {
    std::fill(V, V + K, T(0));
    active.clear();
    for (const int64_t j : js) {
        const T pj = pre(j);
        if (pj <= T(0)) continue;  // NaN counts as active
        active.push_back(j);
        const T* pt = PhiT + j * K;
        for (int64_t k = 0; k < K; ++k) V[k] += pj * pt[k];
    }
    for (int64_t k = 0; k < K; ++k) V[k] -= xi[k];
    return nanmax(V, K);
}

}  // namespace

void project(const double* h0, const double* A, const double* c, const double* margin, const double* M, double* hout,
             double* lam, int64_t* status, int64_t B, int64_t d, int64_t K, int threads) {
    parallel_for(B, threads, [&](int64_t r0, int64_t r1) {
        ProjectWork ws(K, d);
        for (int64_t r = r0; r < r1; ++r)
            status[r] = project_row(h0 + r * d, A + r * K * d, c + r * K, margin + r * K, M, hout + r * d, lam + r * K,
                                    ws, d, K);
    });
}

// out[r][j] = rows[r] · W[j] for any number of rows and the first n rows of W: W is read once per
// kPassRows rows (each dot product sums in the same order whatever the number of rows).
constexpr int kPassRows = 4;

template <typename T, typename WT>
void pre_rows_any(const WT* W, int64_t n, const std::vector<const T*>& rows, const std::vector<T*>& outs, int64_t d) {
    const int64_t R = static_cast<int64_t>(rows.size());
    int64_t r = 0;
    for (; r + kPassRows <= R; r += kPassRows) pre_rows<kPassRows>(W, n, rows.data() + r, d, outs.data() + r);
    switch (R - r) {
        case 1: pre_rows<1>(W, n, rows.data() + r, d, outs.data() + r); break;
        case 2: pre_rows<2>(W, n, rows.data() + r, d, outs.data() + r); break;
        case 3: pre_rows<3>(W, n, rows.data() + r, d, outs.data() + r); break;
        default: break;
    }
}

// One row of projection_steer in progress.
template <typename T>
struct SteerRow {
    std::vector<T> ph, pb, ps, x, base, step;  // p(h) + b, p(base) + b after a short segment, W·step [F]; [d]
    std::vector<double> g, mv, G, GM;           // Aᵀλ, (A M)ᵀλ and their sums since the last reset [d]
    std::vector<int64_t> actx;                  // the active features at x
    T slack = 0;
    double best = std::numeric_limits<double>::infinity();
    int64_t used = 0;
    bool live = true, failed = false, restore = false;

    SteerRow(int64_t F, int64_t d)
        : ph(F), pb(F), ps(F), x(d), base(d), step(d), g(d), mv(d), G(d), GM(d) {}
};

template <typename T, typename WT>
void projection_steer(const T* h, const WT* W, const T* b, const T* PhiT, const T* xi, const double* M,
                      const T* WM, const double* wnorm, T* out, int64_t* rounds, int64_t* status, int64_t n,
                      int64_t d, int64_t F, int64_t K, SteerConfig cfg, int threads) {
    const double m = cfg.margin;
    const int64_t nw = mask_words(F), ramp = std::min(cfg.ramp_rounds, cfg.max_rounds);
    // |fl(W_j·y) − W_j·y| and the rounding of y = base + t·step, with room to spare
    const double gamma = 8.0 * static_cast<double>(d) * std::numeric_limits<T>::epsilon();
    // Rows go in groups of up to kSteerGroup in lockstep, round by round, so that each round's pass
    // over W serves every row of the group (the pass is bound by reading W, not by arithmetic).
    constexpr int64_t kSteerGroup = 8;
    parallel_for(n, threads, [&](int64_t r0, int64_t r1) {
        ProjectWork ws(K, d);
        std::vector<T> y(d), A(K * d), c(K), V(K), V1(K), Vhi(K);
        std::vector<T> MAt(WM ? K * d : 0), cM(K);
        std::vector<double> Ad(K * d), cd(K), mg(K), based(d), hd(d), lam(K), top(F);
        std::vector<uint64_t> words(nw);
        std::vector<int64_t> all(F), cand, act, act1, acthi;
        for (int64_t j = 0; j < F; ++j) all[j] = j;
        std::vector<SteerRow<T>> group;
        std::vector<const T*> prow;
        std::vector<T*> pout;
        for (int64_t g0 = r0; g0 < r1; g0 += kSteerGroup) {
            const int64_t ng = std::min(kSteerGroup, r1 - g0);
            while (static_cast<int64_t>(group.size()) < ng) group.emplace_back(F, d);
            // pre-activations at h, in full: the activation pattern and violations of h
            prow.clear();
            pout.clear();
            for (int64_t q = 0; q < ng; ++q) {
                prow.push_back(h + (g0 + q) * d);
                pout.push_back(group[q].ph.data());
            }
            pre_rows_any(W, F, prow, pout, d);
            for (int64_t q = 0; q < ng; ++q) {
                SteerRow<T>& s = group[q];
                const T* hr = h + (g0 + q) * d;
                for (int64_t j = 0; j < F; ++j) s.ph[j] += b[j];
                violations_over(all, [&](int64_t j) { return s.ph[j]; }, PhiT, xi, K, V.data(), s.actx);
                T vabs = 0;
                for (int64_t k = 0; k < K; ++k) vabs = std::isnan(V[k]) ? V[k] : std::max(vabs, std::abs(V[k]));
                // aim a hair deeper, so that rounding h* to the states' dtype cannot leave it short
                s.slack = T(1e-4) * (T(1.0 + m) + vabs);
                std::copy(hr, hr + d, s.x.begin());
                std::copy(hr, hr + d, out + (g0 + q) * d);
                s.best = std::numeric_limits<double>::infinity();
                s.used = 0;
                s.live = true;
                s.failed = s.restore = false;
                status[g0 + q] = kOk;
                std::fill(s.G.begin(), s.G.end(), 0.0);
                std::fill(s.GM.begin(), s.GM.end(), 0.0);
            }
            for (int64_t r = 1; r <= cfg.max_rounds; ++r) {
                const double depth = m * std::min(1.0, static_cast<double>(r) / static_cast<double>(ramp));
                // 1. each live row: linearise at x (A = Φ D W, c = ξ − Φ D b) and project base onto the model
                for (int64_t q = 0; q < ng; ++q) {
                    SteerRow<T>& s = group[q];
                    if (!s.live) continue;
                    const T* bs = s.restore ? s.x.data() : h + (g0 + q) * d;
                    std::copy(bs, bs + d, s.base.begin());
                    std::fill(words.begin(), words.end(), uint64_t{0});
                    for (const int64_t j : s.actx) words[j / kTile] |= uint64_t{1} << (j % kTile);
                    jacobian<T, WT>(W, b, PhiT, xi, words.data(), A.data(), c.data(), 1, d, F, K, 1);
                    const T mgT = T(depth) + s.slack;
                    for (int64_t k = 0; k < K; ++k) {
                        cd[k] = c[k];
                        mg[k] = mgT;
                    }
                    for (int64_t t = 0; t < K * d; ++t) Ad[t] = A[t];
                    for (int64_t t = 0; t < d; ++t) based[t] = s.base[t];
                    // the rows of A M: Φ D (W M) over the active features from the rows of W M (WM), else A times M
                    const double* MA = Ad.data();
                    if (M && WM) {
                        // (the c it also writes, into cM, equals c above and is not used)
                        jacobian<T, T>(WM, b, PhiT, xi, words.data(), MAt.data(), cM.data(), 1, d, F, K, 1);
                        for (int64_t t = 0; t < K * d; ++t) ws.MA[t] = MAt[t];
                        MA = ws.MA.data();
                    } else if (M) {
                        times_matrix(Ad.data(), M, ws.MA.data(), K, d);
                        MA = ws.MA.data();
                    }
                    const int64_t st = project_rows_of(based.data(), Ad.data(), MA, cd.data(), mg.data(), hd.data(),
                                                       lam.data(), ws, d, K);
                    if (st != kOk) {
                        status[g0 + q] = st;
                        s.failed = s.used == 0;
                        s.live = false;
                        continue;
                    }
                    for (int64_t t = 0; t < d; ++t) s.step[t] = static_cast<T>(hd[t]) - s.base[t];
                    // g = Aᵀλ and M g = (A M)ᵀλ: the step from base is −t·M g
                    std::fill(s.g.begin(), s.g.end(), 0.0);
                    std::fill(s.mv.begin(), s.mv.end(), 0.0);
                    for (int64_t k = 0; k < K; ++k)
                        for (int64_t t = 0; t < d; ++t) {
                            s.g[t] += Ad[k * d + t] * lam[k];
                            s.mv[t] += MA[k * d + t] * lam[k];
                        }
                    ++s.used;
                }
                // 2. one pass over W for every live row: W·step, and W·base after a short segment
                prow.clear();
                pout.clear();
                for (int64_t q = 0; q < ng; ++q) {
                    SteerRow<T>& s = group[q];
                    if (!s.live) continue;
                    prow.push_back(s.step.data());
                    pout.push_back(s.ps.data());
                    if (s.restore) {
                        prow.push_back(s.base.data());
                        pout.push_back(s.pb.data());
                    }
                }
                if (prow.empty()) break;
                pre_rows_any(W, F, prow, pout, d);
                // 3. each live row: the nearest point at this depth on the segment (the linear model changes on
                //    the way), then the bookkeeping of the best point
                for (int64_t q = 0; q < ng; ++q) {
                    SteerRow<T>& s = group[q];
                    if (!s.live) continue;
                    T* o = out + (g0 + q) * d;
                    if (s.restore)
                        for (int64_t j = 0; j < F; ++j) s.pb[j] += b[j];
                    const T* pbase = s.restore ? s.pb.data() : s.ph.data();
                    const T* ps = s.ps.data();
                    const T level = T(-depth) - s.slack / T(2);
                    double nb = 0, ns = 0;
                    for (int64_t t = 0; t < d; ++t) {
                        nb += static_cast<double>(s.base[t]) * s.base[t];
                        ns += static_cast<double>(s.step[t]) * s.step[t];
                    }
                    const double span = std::sqrt(nb) + std::sqrt(ns);
                    // the bound of every feature (one vectorised pass), then the candidates
                    for (int64_t j = 0; j < F; ++j)
                        top[j] = static_cast<double>(pbase[j]) + std::max(0.0, static_cast<double>(ps[j])) +
                                 gamma * (wnorm[j] * span + std::abs(static_cast<double>(b[j])));
                    cand.clear();
                    for (int64_t j = 0; j < F; ++j)
                        if (!(top[j] < 0)) cand.push_back(j);
                    // the violations at base + t·step from its pre-activations p_j(base) + t·(W_j·step), the
                    // candidates' (every other feature is inactive on the whole segment)
                    auto judge = [&](T t, T* Vt, std::vector<int64_t>& active) {
                        return violations_over(cand, [&](int64_t j) { return pbase[j] + t * ps[j]; }, PhiT, xi, K,
                                               Vt, active);
                    };
                    const bool ok = judge(T(1), V1.data(), act1) <= level;
                    bool moved = false;  // hi < 1
                    T lo = 0, hi = 1;
                    for (int64_t k = 0; ok && k < cfg.bisections; ++k) {  // (a short segment ignores the bisection)
                        const T mid = (lo + hi) / T(2);
                        if (judge(mid, V.data(), act) <= level) {
                            hi = mid;
                            moved = true;
                            std::swap(Vhi, V);
                            std::swap(acthi, act);
                        } else {
                            lo = mid;
                        }
                    }
                    const bool shrt = !ok;
                    const T t = shrt ? T(1) : hi;
                    const T* Vnew = moved ? Vhi.data() : V1.data();
                    for (int64_t u = 0; u < d; ++u) y[u] = s.base[u] + t * s.step[u];
                    // x − h = −M G with G = Σ t_r g_r since the last reset: ‖x − h‖² in M⁻¹ is Gᵀ (M G)
                    for (int64_t u = 0; u < d; ++u) {
                        s.G[u] = (s.restore ? s.G[u] : 0.0) + static_cast<double>(t) * s.g[u];
                        s.GM[u] = (s.restore ? s.GM[u] : 0.0) + static_cast<double>(t) * s.mv[u];
                    }
                    const double dist = std::sqrt(dotd(s.G.data(), s.GM.data(), d));
                    const bool reached = nanmax(Vnew, K) <= T(-m);
                    const bool better = reached && dist < s.best * (1 - 1e-3);
                    if (better || std::isinf(s.best)) std::copy(y.begin(), y.end(), o);
                    if (better) s.best = dist;
                    std::copy(y.begin(), y.end(), s.x.begin());
                    s.actx = moved ? acthi : act1;
                    s.restore = shrt;
                    s.live = depth < m || !reached || better;  // else at depth m and no closer: done
                }
            }
            for (int64_t q = 0; q < ng; ++q) {
                rounds[g0 + q] = group[q].used;
                if (group[q].failed)
                    std::fill(out + (g0 + q) * d, out + (g0 + q + 1) * d, std::numeric_limits<T>::quiet_NaN());
            }
        }
    });
}

template void projection_steer<float, float>(const float*, const float*, const float*, const float*, const float*,
                                             const double*, const float*, const double*, float*, int64_t*, int64_t*,
                                             int64_t, int64_t, int64_t, int64_t, SteerConfig, int);
template void projection_steer<double, double>(const double*, const double*, const double*, const double*,
                                               const double*, const double*, const double*, const double*, double*,
                                               int64_t*, int64_t*, int64_t, int64_t, int64_t, int64_t, SteerConfig,
                                               int);
template void projection_steer<float, bf16>(const float*, const bf16*, const float*, const float*, const float*,
                                            const double*, const float*, const double*, float*, int64_t*, int64_t*,
                                            int64_t, int64_t, int64_t, int64_t, SteerConfig, int);

}  // namespace safeflow
