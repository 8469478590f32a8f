// CPU kernels of the model in fp32, loaded with ctypes by jamba/native.py, which documents shapes and checks
// arguments; nothing here validates.
// - The Mamba mixer: the causal conv with SiLU (whole sequence and one token) and the selective scan fused with what
//   surrounds it (RMSNorm of dt, B and C, the dt projection, softplus, the D skip and the SiLU gate).
// - Decode-sized steps (a few rows): matrix products that read each weight once, the SwiGLU MLP, the experts, the
//   attention step from the cache, and whole halves of a block, so that a step makes a few calls per layer.
//
// Layout: activations are (B, L, I) with channels last, so eight neighbouring channels form one vector and the
// scan runs eight channels at a time; I must be a multiple of 8. The SSM state is (slots, I, N) and the conv
// window (slots, I, W), the layout of jamba.model.HybridCache.
//
// Vectors are GCC vector extensions, so the compiler emits AVX2 where the build enables it and narrower code
// elsewhere. Builds with AVX-512 also get a matrix product for 9 rows or more written with its intrinsics. exp
// and log1p are polynomial approximations (relative error below 1e-6), because a scalar libm call per element
// would cost more than the rest of the scan. Work is split over PyTorch's intra-op threads.

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int kMaxState = 64;
// Below this many activations (B * L * I) a call runs on the calling thread: waking the pool would cost more.
constexpr int64_t kSplitWork = 1 << 15;

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

inline v8 load8(const float* p) {
    v8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// The math below also runs on 16-float vectors where the build has AVX-512 (the decode scan's state of 16).
#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
#endif
template <class V> struct IntVector;
template <> struct IntVector<v8> { typedef v8i type; };
#if defined(__AVX512F__)
template <> struct IntVector<v16> { typedef v16i type; };
#endif

template <class V>
inline V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

template <class V>
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }

template <class V>
inline V vmin(V a, V b) { return a < b ? a : b; }
template <class V>
inline V vmax(V a, V b) { return a > b ? a : b; }

// exp(x) for x in [-87, 88]: x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^6 (relative
// error below 2e-7), times 2^k built in the exponent bits, where 2^k stays a normal float.
template <class V>
inline V exp_in_range(V x) {
    const V round = V{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
    V k = (x * 1.44269504088896341f + round) - round;
    V r = x - k * 0.693359375f - k * -2.12194440e-4f;
    V p = V{} + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    typedef typename IntVector<V>::type VI;
    VI bits = (__builtin_convertvector(k, VI) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline v8 exp8(v8 x) { return exp_in_range(vmin(vmax(x, splat(-87.0f)), splat(88.0f))); }

// exp(x) for x <= 0, as the state's decay exp(delta * A) always is; below -87 it returns about 1e-38, not 0.
template <class V>
inline V exp_nonpositive(V x) { return exp_in_range(vmax(x, V{} - 87.0f)); }

// log(1 + y) for y in [0, 1], as 2 atanh(s) with s = y / (2 + y) <= 1/3, to the s^13 term.
inline v8 log1p_unit8(v8 y) {
    v8 s = y / (splat(2.0f) + y);
    v8 s2 = s * s;
    v8 p = splat(1.0f / 13);
    p = p * s2 + splat(1.0f / 11);
    p = p * s2 + splat(1.0f / 9);
    p = p * s2 + splat(1.0f / 7);
    p = p * s2 + splat(1.0f / 5);
    p = p * s2 + splat(1.0f / 3);
    p = p * s2 + splat(1.0f);
    return splat(2.0f) * s * p;
}

inline v8 softplus8(v8 x) {
    v8 magnitude = x < splat(0.0f) ? -x : x;
    return vmax(x, splat(0.0f)) + log1p_unit8(exp8(-magnitude));
}

inline v8 silu8(v8 x) { return x / (splat(1.0f) + exp8(-x)); }

// Run fn(first, last) over ranges of [0, count) on PyTorch's intra-op threads, or on the calling thread when the
// work is small. Sharing the pool that PyTorch's operators use keeps a second set of threads off the cores.
template <typename Fn>
void parallel_for(int64_t count, bool split, const Fn& fn) {
    if (!split) {
        fn(int64_t{0}, count);
        return;
    }
    at::parallel_for(0, count, 1, fn);
}

// RMSNorm of n values in place: x * weight / sqrt(mean(x^2) + eps), in the order of torch's rms_norm.
void rms_norm(float* x, const float* weight, int64_t n, float eps) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += x[j] * x[j];
    float scale = 1.0f / __builtin_sqrtf(sum / static_cast<float>(n) + eps);
    for (int64_t j = 0; j < n; ++j) x[j] = x[j] * scale * weight[j];
}

void linear_small(const float* x, int64_t sx, const float* weight, const float* bias, float* out, int64_t M,
                  int64_t N, int64_t K);

// Update the state of one channel for one row and return its output before D and the gate. A vector V contains a
// slice of the N state values, which are contiguous in the cache, so they are read and written in place.
template <class V>
inline float scan_channel(float* h, const float* a, const float* p_b, const float* p_c, float delta, float du,
                          int64_t N) {
    V acc = V{};
    for (int64_t n0 = 0; n0 < N; n0 += sizeof(V) / sizeof(float)) {
        V next = exp_nonpositive(load<V>(a + n0) * delta) * load<V>(h + n0) + load<V>(p_b + n0) * du;
        store(h + n0, next);
        acc += next * load<V>(p_c + n0);
    }
    float sum = 0.0f;
    for (size_t k = 0; k < sizeof(V) / sizeof(float); ++k) sum += acc[k];
    return sum;
}

// One token per row from the cached state. delta comes first, for all rows in one product. Then threads take
// ranges of 64 channels, and compute the gate of eight channels before their states. normed is (B, R + 2N) after
// the norms, dt_weight (I, R).
void scan_step(const float* u, const float* normed, const float* z, int64_t sz_b, const float* dt_weight,
               const float* dt_bias, const float* A, const float* D, float* y, float* ssm_cache,
               const int64_t* slots, int64_t B, int64_t I, int64_t N, int64_t R) {
    const int64_t width = R + 2 * N;
    std::vector<float> deltas(B * I);
    if (R % 8 == 0) {
        linear_small(normed, width, dt_weight, dt_bias, deltas.data(), B, I, R);
    } else {
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t i = 0; i < I; ++i) {
                float dot = dt_bias[i];
                for (int64_t r = 0; r < R; ++r) dot += normed[b * width + r] * dt_weight[i * R + r];
                deltas[b * I + i] = dot;
            }
        }
    }
    auto run = [&](int64_t first, int64_t last) {  // blocks of eight channels
        float delta[8], gate[8];
        for (int64_t b = 0; b < B; ++b) {
            const float* p = normed + b * width;
            float* state = ssm_cache + slots[b] * I * N;
            const float* row_u = u + b * I;
            for (int64_t block = first; block < last; ++block) {
                const int64_t i0 = block * 8;
                store8(delta, softplus8(load8(&deltas[b * I + i0])));
                store8(gate, silu8(load8(z + b * sz_b + i0)));
                for (int c = 0; c < 8; ++c) {
                    const int64_t i = i0 + c;
                    float* h = state + i * N;
#if defined(__AVX512F__)
                    float sum = N % 16 == 0
                        ? scan_channel<v16>(h, A + i * N, p + R, p + R + N, delta[c], delta[c] * row_u[i], N)
                        : scan_channel<v8>(h, A + i * N, p + R, p + R + N, delta[c], delta[c] * row_u[i], N);
#else
                    float sum = scan_channel<v8>(h, A + i * N, p + R, p + R + N, delta[c], delta[c] * row_u[i], N);
#endif
                    if (D) sum += D[i] * row_u[i];
                    y[b * I + i] = sum * gate[c];
                }
            }
        }
    };
    if (B * I * N >= (1 << 14)) {
        at::parallel_for(0, I / 8, 8, run);
    } else {
        run(0, I / 8);
    }
}

// out[m, n] = x[m] . weight[n] (+ bias[n]) for ROWS rows of x and the weight rows [first, last).
template <int ROWS>
void dot_rows(const float* x, int64_t sx, const float* weight, const float* bias, float* out, int64_t N,
              int64_t first, int64_t last, int64_t K) {
    for (int64_t n = first; n < last; ++n) {
        const float* w = weight + n * K;
        v8 acc[ROWS];
        for (int m = 0; m < ROWS; ++m) acc[m] = splat(0.0f);
        for (int64_t k = 0; k < K; k += 8) {
            const v8 w8 = load8(w + k);
            for (int m = 0; m < ROWS; ++m) acc[m] += w8 * load8(x + m * sx + k);
        }
        for (int m = 0; m < ROWS; ++m) {
            float sum = bias ? bias[n] : 0.0f;
            for (int c = 0; c < 8; ++c) sum += acc[m][c];
            out[m * N + n] = sum;
        }
    }
}

#if defined(__AVX512F__)
// Rows from which linear_small broadcasts weights against transposed rows (below, the dot products win).
constexpr int64_t kBroadcastRows = 9;
constexpr int kBroadcastWeightRows = 6;

// Rows of x per panel of the broadcast kernel: a panel is x's rows transposed, (K, 32), so that its loads walk
// memory in order.
constexpr int64_t kPanelRows = 32;

// The products of the weight rows [n, n + WR) with the rows of one panel (16 * MV of its 32 lanes), written to
// yt (N, 32), the transposed results of that panel. Each weight value is broadcast and multiplied with 16 rows at
// once, so the sums need no horizontal adds. 6 x 2 accumulators fit the 32 registers with room for the operands.
template <int WR, int MV>
void broadcast_block(const float* panel, const float* weight, const float* bias, float* yt, int64_t n, int64_t K) {
    __m512 acc[WR][MV];
    for (int r = 0; r < WR; ++r) {
        const __m512 b = _mm512_set1_ps(bias ? bias[n + r] : 0.0f);
        for (int j = 0; j < MV; ++j) acc[r][j] = b;
    }
    const float* w = weight + n * K;
    for (int64_t k = 0; k < K; ++k) {
        __m512 xv[MV];
        for (int j = 0; j < MV; ++j) xv[j] = _mm512_loadu_ps(panel + k * kPanelRows + 16 * j);
        for (int r = 0; r < WR; ++r) {
            const __m512 wv = _mm512_set1_ps(w[r * K + k]);
            for (int j = 0; j < MV; ++j) acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < WR; ++r) {
        for (int j = 0; j < MV; ++j) _mm512_storeu_ps(yt + (n + r) * kPanelRows + 16 * j, acc[r][j]);
    }
}

// linear_small for kBroadcastRows rows or more, any number of them. Rows go in chunks of up to 256 (8 panels, 256 K
// floats, which stay in L2). Within a chunk, threads take blocks of 6 weight rows (12 when the chunk has at most
// 16 rows), and each block serves every panel while it sits in L1. The results go to transposed buffers first: written straight into out, 16 rows
// apart, they would land in one cache set when N is a multiple of 1024.
void linear_broadcast(const float* x, int64_t sx, const float* weight, const float* bias, float* out, int64_t M,
                      int64_t N, int64_t K) {
    constexpr int64_t kChunkRows = 8 * kPanelRows;
    std::vector<float> xt, yt;
    for (int64_t c0 = 0; c0 < M; c0 += kChunkRows) {
        const int64_t rows = std::min(kChunkRows, M - c0), panels = (rows + kPanelRows - 1) / kPanelRows;
        // One vector of rows leaves registers for twice the weight rows, which keeps the loads per multiply low.
        const int64_t block_rows = rows <= 16 ? 2 * kBroadcastWeightRows : kBroadcastWeightRows;
        const int64_t blocks = (N + block_rows - 1) / block_rows;
        xt.assign(panels * K * kPanelRows, 0.0f);
        yt.resize(panels * N * kPanelRows);
        for (int64_t m = 0; m < rows; ++m) {
            float* panel = &xt[(m / kPanelRows) * K * kPanelRows] + m % kPanelRows;
            for (int64_t k = 0; k < K; ++k) panel[k * kPanelRows] = x[(c0 + m) * sx + k];
        }
        at::parallel_for(0, blocks, 8, [&](int64_t first, int64_t last) {
            for (int64_t block = first; block < last; ++block) {
                const int64_t n = block * block_rows, weight_rows = std::min(block_rows, N - n);
                for (int64_t p = 0; p < panels; ++p) {
                    const float* panel = &xt[p * K * kPanelRows];
                    float* results = &yt[p * N * kPanelRows];
                    const bool two = rows - p * kPanelRows > 16;
                    if (weight_rows == 2 * kBroadcastWeightRows) {
                        broadcast_block<2 * kBroadcastWeightRows, 1>(panel, weight, bias, results, n, K);
                    } else if (weight_rows == kBroadcastWeightRows) {
                        if (two) broadcast_block<kBroadcastWeightRows, 2>(panel, weight, bias, results, n, K);
                        else broadcast_block<kBroadcastWeightRows, 1>(panel, weight, bias, results, n, K);
                    } else {
                        for (int64_t r = n; r < n + weight_rows; ++r) {
                            if (two) broadcast_block<1, 2>(panel, weight, bias, results, r, K);
                            else broadcast_block<1, 1>(panel, weight, bias, results, r, K);
                        }
                    }
                }
            }
            const int64_t n_first = first * block_rows, n_last = std::min(N, last * block_rows);
            for (int64_t m = 0; m < rows; ++m) {
                const float* results = &yt[(m / kPanelRows) * N * kPanelRows] + m % kPanelRows;
                float* row = out + (c0 + m) * N;
                for (int64_t n = n_first; n < n_last; ++n) row[n] = results[n * kPanelRows];
            }
        });
    }
}
#endif

// out (M, N) = x (M, K) @ weight (N, K)^T (+ bias), K a multiple of 8. Threads take slices of 64 weight rows. A
// slice (64 K floats) stays in L2 while it serves the rows of x eight at a time, so the weights come from memory once.
// With AVX-512 and kBroadcastRows rows or more, linear_broadcast does the work.
void linear_small(const float* x, int64_t sx, const float* weight, const float* bias, float* out, int64_t M,
                  int64_t N, int64_t K) {
#if defined(__AVX512F__)
    if (M >= kBroadcastRows) {
        linear_broadcast(x, sx, weight, bias, out, M, N, K);
        return;
    }
#endif
    at::parallel_for(0, N, 64, [&](int64_t first, int64_t last) {
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const float* xs = x + m0 * sx;
            float* os = out + m0 * N;
            switch (M - m0 < 8 ? M - m0 : 8) {
                case 1: dot_rows<1>(xs, sx, weight, bias, os, N, first, last, K); break;
                case 2: dot_rows<2>(xs, sx, weight, bias, os, N, first, last, K); break;
                case 3: dot_rows<3>(xs, sx, weight, bias, os, N, first, last, K); break;
                case 4: dot_rows<4>(xs, sx, weight, bias, os, N, first, last, K); break;
                case 5: dot_rows<5>(xs, sx, weight, bias, os, N, first, last, K); break;
                case 6: dot_rows<6>(xs, sx, weight, bias, os, N, first, last, K); break;
                case 7: dot_rows<7>(xs, sx, weight, bias, os, N, first, last, K); break;
                default: dot_rows<8>(xs, sx, weight, bias, os, N, first, last, K); break;
            }
        }
    });
}

// out (M, D) = (silu(x Wg^T) * (x Wu^T)) Wd^T for x (M, D) contiguous, Wg and Wu (F, D), Wd (D, F).
void swiglu_mlp(const float* x, const float* gate, const float* up, const float* down, float* out, int64_t M,
                int64_t D, int64_t F) {
    std::vector<float> g(M * F), u(M * F);
    linear_small(x, D, gate, nullptr, g.data(), M, F, D);
    linear_small(x, D, up, nullptr, u.data(), M, F, D);
    for (int64_t j = 0; j < M * F; j += 8) store8(&g[j], silu8(load8(&g[j])) * load8(&u[j]));
    linear_small(g.data(), F, down, nullptr, out, M, D, F);
}

// jamba.model.run_experts for a few tokens: out (T, D) = sum over (t, k) with experts[t, k] among the E given
// experts of weights[t, k] * mlp_e(x[t]). Expert e has id ids[e] and weights at the addresses gates[e], ups[e],
// downs[e]. Each expert runs once on the rows routed to it, so its weights are read once.
void moe_small(const float* x, const float* weights, const int64_t* experts, int64_t T, int64_t K,
               const int64_t* ids, const int64_t* gates, const int64_t* ups, const int64_t* downs, int64_t E,
               float* out, int64_t D, int64_t F) {
    // The rows of each expert, then the experts on the threads (one expert's three products per thread, so one
    // parallel region in all), then the sum in expert order.
    std::vector<std::vector<int64_t>> token(E);
    std::vector<std::vector<float>> scale(E), rows(E), results(E);
    for (int64_t e = 0; e < E; ++e) {
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t k = 0; k < K; ++k) {
                if (experts[t * K + k] != ids[e]) continue;
                token[e].push_back(t);
                scale[e].push_back(weights[t * K + k]);
                rows[e].insert(rows[e].end(), x + t * D, x + (t + 1) * D);
            }
        }
        results[e].resize(token[e].size() * D);
    }
    at::parallel_for(0, E, 1, [&](int64_t first, int64_t last) {
        for (int64_t e = first; e < last; ++e) {
            if (token[e].empty()) continue;
            swiglu_mlp(rows[e].data(), reinterpret_cast<const float*>(gates[e]),
                       reinterpret_cast<const float*>(ups[e]), reinterpret_cast<const float*>(downs[e]),
                       results[e].data(), static_cast<int64_t>(token[e].size()), D, F);
        }
    });
    std::memset(out, 0, T * D * sizeof(float));
    for (int64_t e = 0; e < E; ++e) {
        for (size_t i = 0; i < token[e].size(); ++i) {
            float* o = out + token[e][i] * D;
            const float* r = &results[e][i * D];
            for (int64_t j = 0; j < D; ++j) o[j] += scale[e][i] * r[j];
        }
    }
}

}  // namespace

extern "C" {

// out (B, L, I) = silu(bias + causal depthwise conv of x), where x[b, t, i] is at x + b * sx_b + t * sx_t + i.
// When conv_cache is given, the last W inputs of each row (zeros before the start) go to its slot's window.
void jamba_conv(const float* x, int64_t sx_b, int64_t sx_t, const float* weight, const float* bias, float* out,
                float* conv_cache, const int64_t* slots, int64_t B, int64_t L, int64_t I, int64_t W) {
    std::vector<float> wt(W * I);  // (W, I)
    for (int64_t i = 0; i < I; ++i)
        for (int64_t k = 0; k < W; ++k) wt[k * I + i] = weight[i * W + k];
    const int64_t blocks = I / 8;
    parallel_for(B * blocks, B * L * I >= kSplitWork, [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task) {
            const int64_t b = task / blocks, i0 = (task % blocks) * 8;
            const v8 b8 = bias ? load8(bias + i0) : splat(0.0f);
            for (int64_t t = 0; t < L; ++t) {
                v8 acc = b8;
                for (int64_t k = 0; k < W; ++k) {
                    int64_t source = t - (W - 1) + k;
                    if (source >= 0) acc += load8(&wt[k * I + i0]) * load8(x + b * sx_b + source * sx_t + i0);
                }
                store8(out + (b * L + t) * I + i0, silu8(acc));
            }
        }
    });
    if (!conv_cache) return;
    for (int64_t b = 0; b < B; ++b) {
        float* window = conv_cache + slots[b] * I * W;
        for (int64_t k = 0; k < W; ++k) {
            int64_t source = L - W + k;
            for (int64_t i = 0; i < I; ++i) window[i * W + k] = source >= 0 ? x[b * sx_b + source * sx_t + i] : 0.0f;
        }
    }
}

// One token per row: shift x[b] (at x + b * sx_b) into its slot's window and write silu(bias + conv) to out (B, I).
void jamba_conv_step(const float* x, int64_t sx_b, const float* weight, const float* bias, float* out,
                     float* conv_cache, const int64_t* slots, int64_t B, int64_t I, int64_t W) {
    for (int64_t b = 0; b < B; ++b) {
        float* window = conv_cache + slots[b] * I * W;
        float* row = out + b * I;
        for (int64_t i = 0; i < I; ++i) {
            float* w = window + i * W;
            const float* k_weight = weight + i * W;
            float acc = bias ? bias[i] : 0.0f;
            for (int64_t k = 0; k + 1 < W; ++k) {
                w[k] = w[k + 1];
                acc += k_weight[k] * w[k];
            }
            w[W - 1] = x[b * sx_b + i];
            row[i] = acc + k_weight[W - 1] * w[W - 1];
        }
        for (int64_t i0 = 0; i0 < I; i0 += 8) store8(row + i0, silu8(load8(row + i0)));
    }
}

// The selective scan with its surroundings, for each row b and step t:
//   dt, Bt, Ct = RMSNorm(dbc[b, t]) split as R, N, N     (dbc is x_proj's output, (B, L, R + 2N))
//   delta = softplus(dt_weight @ dt + dt_bias)          (I,)
//   h = exp(delta * A) * h + delta * u[b, t] * Bt        (I, N)
//   y[b, t] = (h @ Ct + D * u[b, t]) * silu(z[b, t])
// u and y are (B, L, I); z[b, t, i] is at z + b * sz_b + t * sz_t + i. h starts from the slot's cached state when
// from_state is set, and from zeros otherwise. The last h goes back to ssm_cache and to last_state, where given.
void jamba_scan(const float* u, const float* dbc, const float* z, int64_t sz_b, int64_t sz_t,
                const float* dt_norm_weight, const float* b_norm_weight, const float* c_norm_weight, float eps,
                const float* dt_weight, const float* dt_bias, const float* A, const float* D, float* y,
                float* ssm_cache, const int64_t* slots, int from_state, float* last_state, int64_t B, int64_t L,
                int64_t I, int64_t N, int64_t R) {
    const int64_t width = R + 2 * N;
    std::vector<float> normed(dbc, dbc + B * L * width);
    for (int64_t row = 0; row < B * L; ++row) {
        float* p = &normed[row * width];
        rms_norm(p, dt_norm_weight, R, eps);
        rms_norm(p + R, b_norm_weight, N, eps);
        rms_norm(p + R + N, c_norm_weight, N, eps);
    }
    if (L == 1 && ssm_cache && from_state && N % 8 == 0) {
        scan_step(u, normed.data(), z, sz_b, dt_weight, dt_bias, A, D, y, ssm_cache, slots, B, I, N, R);
        return;
    }
    std::vector<float> dt_t(R * I), a_t(N * I);  // (R, I) and (N, I): eight channels side by side
    for (int64_t i = 0; i < I; ++i) {
        for (int64_t r = 0; r < R; ++r) dt_t[r * I + i] = dt_weight[i * R + r];
        for (int64_t n = 0; n < N; ++n) a_t[n * I + i] = A[i * N + n];
    }
    const int64_t blocks = I / 8;
    auto run = [&](int64_t first, int64_t last) {
        v8 h[kMaxState];
        for (int64_t task = first; task < last; ++task) {
            const int64_t b = task / blocks, i0 = (task % blocks) * 8;
            float* cached = ssm_cache ? ssm_cache + slots[b] * I * N : nullptr;
            for (int64_t n = 0; n < N; ++n)
                for (int c = 0; c < 8; ++c) h[n][c] = from_state ? cached[(i0 + c) * N + n] : 0.0f;
            const v8 bias8 = load8(dt_bias + i0);
            const v8 d8 = D ? load8(D + i0) : splat(0.0f);
            for (int64_t t = 0; t < L; ++t) {
                const float* p = &normed[(b * L + t) * width];
                v8 delta = bias8;
                for (int64_t r = 0; r < R; ++r) delta += splat(p[r]) * load8(&dt_t[r * I + i0]);
                delta = softplus8(delta);
                const v8 u8 = load8(u + (b * L + t) * I + i0);
                const v8 du = delta * u8;
                v8 acc = splat(0.0f);
                for (int64_t n = 0; n < N; ++n) {
                    h[n] = exp_nonpositive(delta * load8(&a_t[n * I + i0])) * h[n] + du * splat(p[R + n]);
                    acc += h[n] * splat(p[R + N + n]);
                }
                acc += d8 * u8;
                store8(y + (b * L + t) * I + i0, acc * silu8(load8(z + b * sz_b + t * sz_t + i0)));
            }
            for (int64_t n = 0; n < N; ++n) {
                for (int c = 0; c < 8; ++c) {
                    if (cached) cached[(i0 + c) * N + n] = h[n][c];
                    if (last_state) last_state[(b * I + i0 + c) * N + n] = h[n][c];
                }
            }
        }
    };
    parallel_for(B * blocks, B * L * I >= kSplitWork, run);
}

// The first half of a Mamba block for one decode step of B rows x (B, Dm), contiguous:
//   out = x + out_proj(mixer(RMSNorm(x)))
// with the mixer as in jamba_conv_step and jamba_scan, reading and updating the slots' conv and SSM state.
void jamba_mamba_step(const float* x, const float* norm_weight, float norm_eps, const float* in_weight,
                      const float* in_bias, const float* conv_weight, const float* conv_bias, float* conv_cache,
                      const float* x_weight, const float* dt_norm_weight, const float* b_norm_weight,
                      const float* c_norm_weight, float eps, const float* dt_weight, const float* dt_bias,
                      const float* A, const float* D, const float* out_weight, const float* out_bias,
                      float* ssm_cache, const int64_t* slots, float* out, int64_t B, int64_t Dm, int64_t I,
                      int64_t N, int64_t R, int64_t W) {
    std::vector<float> h(x, x + B * Dm), xz(B * 2 * I), u(B * I), dbc(B * (R + 2 * N)), y(B * I);
    for (int64_t b = 0; b < B; ++b) rms_norm(&h[b * Dm], norm_weight, Dm, norm_eps);
    linear_small(h.data(), Dm, in_weight, in_bias, xz.data(), B, 2 * I, Dm);
    jamba_conv_step(xz.data(), 2 * I, conv_weight, conv_bias, u.data(), conv_cache, slots, B, I, W);
    linear_small(u.data(), I, x_weight, nullptr, dbc.data(), B, R + 2 * N, I);
    jamba_scan(u.data(), dbc.data(), xz.data() + I, 2 * I, 2 * I, dt_norm_weight, b_norm_weight, c_norm_weight, eps,
               dt_weight, dt_bias, A, D, y.data(), ssm_cache, slots, 1, nullptr, B, 1, I, N, R);
    linear_small(y.data(), I, out_weight, out_bias, out, B, Dm, I);
    for (int64_t j = 0; j < B * Dm; ++j) out[j] += x[j];
}

// The number of rows from which jamba_linear_small takes the AVX-512 broadcast kernel at any size, or 0 when it
// serves only the decode sizes that jamba.native.MAX_LINEAR_ROWS gives. On the development machine that kernel
// beat MKL at every shape tried (8 to 2048 rows, weights up to 14336 x 4096).
int64_t jamba_wide_product_rows() {
#if defined(__AVX512F__)
    return kBroadcastRows;
#else
    return 0;
#endif
}

// out (M, N) = x (M, K) @ weight (N, K)^T (+ bias) for a few rows (decode steps), K a multiple of 8; x's rows are
// sx floats apart. At these sizes a step is bound by reading the weights, and this reads each once, on all of
// PyTorch's threads (MKL repacks the weights on every call).
void jamba_linear_small(const float* x, int64_t sx, const float* weight, const float* bias, float* out, int64_t M,
                        int64_t N, int64_t K) {
    linear_small(x, sx, weight, bias, out, M, N, K);
}

// The SwiGLU MLP of jamba.model.MLP for a few rows: out (M, D) from x (M, D) contiguous; D and F multiples of 8.
void jamba_mlp_small(const float* x, const float* gate, const float* up, const float* down, float* out, int64_t M,
                     int64_t D, int64_t F) {
    swiglu_mlp(x, gate, up, down, out, M, D, F);
}

// One decode step of grouped-query attention straight from the cache. For each row b, K and V of the new token
// (k, v: (B, G, Dh)) go to position positions[b] of slot slots[b] (keys, values: (S, G, T, Dh)). Then each of the
// H query heads (q: (B, H, Dh)) attends over positions 0..positions[b] of its group with softmax(q . k * scale);
// head h uses group h / (H / G). out is (B, H, Dh).
void jamba_attention_step(const float* q, const float* k, const float* v, float* keys, float* values,
                          const int64_t* slots, const int64_t* positions, float* out, int64_t B, int64_t H,
                          int64_t G, int64_t T, int64_t Dh, float scale) {
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t g = 0; g < G; ++g) {
            const int64_t base = (slots[b] * G + g) * T * Dh;
            std::memcpy(keys + base + positions[b] * Dh, k + (b * G + g) * Dh, Dh * sizeof(float));
            std::memcpy(values + base + positions[b] * Dh, v + (b * G + g) * Dh, Dh * sizeof(float));
        }
    }
    const int64_t per_group = H / G;
    parallel_for(B * H, B * H * T * Dh >= kSplitWork, [&](int64_t first, int64_t last) {
        std::vector<float> scores;
        for (int64_t task = first; task < last; ++task) {
            const int64_t b = task / H, h = task % H, span = positions[b] + 1;
            const int64_t base = (slots[b] * G + h / per_group) * T * Dh;
            const float* query = q + (b * H + h) * Dh;
            scores.resize(span);
            float top = -3.4e38f;
            for (int64_t t = 0; t < span; ++t) {
                const float* key = keys + base + t * Dh;
                float dot = 0.0f;
                for (int64_t d = 0; d < Dh; ++d) dot += query[d] * key[d];
                scores[t] = dot * scale;
                top = scores[t] > top ? scores[t] : top;
            }
            float total = 0.0f;
            for (int64_t t = 0; t < span; ++t) {
                scores[t] = __builtin_expf(scores[t] - top);
                total += scores[t];
            }
            float* o = out + (b * H + h) * Dh;
            for (int64_t d = 0; d < Dh; ++d) o[d] = 0.0f;
            for (int64_t t = 0; t < span; ++t) {
                const float* value = values + base + t * Dh;
                const float weight = scores[t] / total;
                for (int64_t d = 0; d < Dh; ++d) o[d] += weight * value[d];
            }
        }
    });
}

// RMSNorm of each of `rows` rows of n values (x contiguous) into out.
void jamba_rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(out + r * n, x + r * n, n * sizeof(float));
        rms_norm(out + r * n, weight, n, eps);
    }
}

// jamba.model.run_experts for a few tokens; see moe_small.
void jamba_moe_small(const float* x, const float* weights, const int64_t* experts, int64_t T, int64_t K,
                     const int64_t* ids, const int64_t* gates, const int64_t* ups, const int64_t* downs, int64_t E,
                     float* out, int64_t D, int64_t F) {
    moe_small(x, weights, experts, T, K, ids, gates, ups, downs, E, out, D, F);
}

// The second half of a block with a dense MLP, for rows x (T, D) contiguous: out = x + mlp(RMSNorm(x)).
void jamba_mlp_block(const float* x, const float* norm_weight, float eps, const float* gate, const float* up,
                     const float* down, float* out, int64_t T, int64_t D, int64_t F) {
    std::vector<float> h(x, x + T * D);
    for (int64_t t = 0; t < T; ++t) rms_norm(&h[t * D], norm_weight, D, eps);
    swiglu_mlp(h.data(), gate, up, down, out, T, D, F);
    for (int64_t j = 0; j < T * D; ++j) out[j] += x[j];
}

// The second half of a block with experts, for rows x (T, D) contiguous: h = RMSNorm(x), router logits
// (T, E) = h @ router^T (written to logits), the K most probable of the softmax per token with their
// probabilities as weights (ties to the lower id, no renormalisation), out = x + the weighted sum of those experts.
// The experts are given as in moe_small, all E of them, with ids 0..E-1.
void jamba_moe_block(const float* x, const float* norm_weight, float eps, const float* router, int64_t K,
                     const int64_t* ids, const int64_t* gates, const int64_t* ups, const int64_t* downs, int64_t E,
                     float* out, float* logits, int64_t T, int64_t D, int64_t F) {
    std::vector<float> h(x, x + T * D), weights(T * K), probs(E), sum(T * D);
    std::vector<int64_t> experts(T * K);
    for (int64_t t = 0; t < T; ++t) rms_norm(&h[t * D], norm_weight, D, eps);
    linear_small(h.data(), D, router, nullptr, logits, T, E, D);
    for (int64_t t = 0; t < T; ++t) {
        const float* row = logits + t * E;
        float top = row[0];
        for (int64_t e = 1; e < E; ++e) top = row[e] > top ? row[e] : top;
        float total = 0.0f;
        for (int64_t e = 0; e < E; ++e) total += probs[e] = __builtin_expf(row[e] - top);
        for (int64_t e = 0; e < E; ++e) probs[e] /= total;
        for (int64_t k = 0; k < K; ++k) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; ++e)
                if (probs[e] >= 0.0f && (best < 0 || probs[e] > probs[best])) best = e;
            experts[t * K + k] = best;
            weights[t * K + k] = probs[best];
            probs[best] = -1.0f;  // taken
        }
    }
    moe_small(h.data(), weights.data(), experts.data(), T, K, ids, gates, ups, downs, E, sum.data(), D, F);
    for (int64_t j = 0; j < T * D; ++j) out[j] = x[j] + sum[j];
}

// out = silu(gate) * up over n values (n a multiple of 8): the SwiGLU product in one pass over memory.
void jamba_silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    parallel_for(n / 8, n >= kSplitWork, [&](int64_t first, int64_t last) {
        for (int64_t j = first * 8; j < last * 8; j += 8) store8(out + j, silu8(load8(gate + j)) * load8(up + j));
    });
}

}  // extern "C"
