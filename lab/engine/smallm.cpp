// y = x W^T (fp32) for a few rows of x, on W packed as [N / 16][K][16]: blocks of 16 output
// channels stored k-major, so each thread streams its blocks in address order, one 64-byte
// line per k gives 16 channels' weights, x[m][k] is broadcast, and no horizontal sums are
// needed. Each output is one fp32 FMA chain over k in order, whatever the number of rows: a
// 1-row decode and a K+1-row verification round alike (batch-invariant), which keeps greedy
// speculation bit-exact against the greedy baseline on this path. AVX2 + FMA (8-float vectors).
// bf16 models: the same layout holds bf16 weights (half the bytes to stream), widened to fp32 in
// registers (a bf16 is the top half of an fp32); x is widened before and y rounded to bf16 after,
// so the FMA chain and its batch invariance are the fp32 path's. Plain AVX2: no bf16 units needed.
// Built with AVX512-BF16 (smallm.py passes the flags where the CPU has them), bf16 weights of an
// even K are packed in pairs instead, [N / 16][K / 2][16][2], and one vdpbf16ps multiplies two
// k of 16 channels by a row's bf16 pair: a quarter of the AVX2 path's instructions, which is what
// a verification step of several rows is bound by once the weights are half the bytes.
// Each output is again a fixed sequence per row (two chains, even and odd pairs), batch-invariant.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <torch/extension.h>

namespace {

constexpr int64_t R = 16;        // output channels per packed block
constexpr int64_t VEC = 8;       // floats per vector
constexpr int64_t AHEAD = 8192;  // prefetch distance in bytes ahead in the stream

typedef float vf __attribute__((vector_size(32)));
typedef float vfu __attribute__((vector_size(32), aligned(4)));

// 8 weights from p as fp32: float as is; bf16 (its bits as uint16) shifted into the top half.
inline vf load8(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline vf load8(const uint16_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
// int8 weights (lab.engine.quantize): widened to fp32; the per-channel scale is applied to y after.
inline vf load8(const int8_t* p) {
  __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
}

// M rows x V vectors of one block, from vector `first` of its 16 channels.
template <int M, int V, typename W>
void tile(const float* x, int64_t K, const W* block, int first, float* y, int64_t N) {
  vf acc[V][M];
  for (int v = 0; v < V; ++v)
    for (int m = 0; m < M; ++m) acc[v][m] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const W* p = block + k * R + first * VEC;
    _mm_prefetch(reinterpret_cast<const char*>(p) + AHEAD, _MM_HINT_T0);
    vf w[V];
    for (int v = 0; v < V; ++v) w[v] = load8(p + v * VEC);
    for (int m = 0; m < M; ++m) {
      vf xb = vf{} + x[m * K + k];
      for (int v = 0; v < V; ++v) acc[v][m] += w[v] * xb;
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < V; ++v) *reinterpret_cast<vfu*>(y + m * N + (first + v) * VEC) = acc[v][m];
}

// Up to 6 rows at a time (12 accumulators of 16 registers), each group over the whole block: the
// first group streams it from memory, later ones find it in L2.
template <typename W>
void block(const float* x, int64_t M, int64_t K, const W* w, float* y, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += 6) {
    const float* xs = x + m0 * K;
    float* ys = y + m0 * N;
    switch (std::min<int64_t>(6, M - m0)) {
#define C(m) case m: tile<m, 2>(xs, K, w, 0, ys, N); break;
      C(1) C(2) C(3) C(4) C(5) C(6)
#undef C
    }
  }
}

#ifdef __AVX512F__
constexpr int64_t WIDE_ROWS = 12;  // rows per group: 2 x 12 accumulators + the weight register

// M rows of one block with 16-channel vectors: step(acc, j) adds step j of the block to each
// row's accumulator. Two accumulators per row (even and odd steps) so one row does not wait on a
// single chain's latency; per row a fixed order, so batch-invariant too.
template <int M, typename Step>
void two_chains(int64_t steps, float* y, int64_t N, Step step) {
  __m512 even[M], odd[M];
  for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 1 < steps; j += 2) {
    step(even, j);
    step(odd, j + 1);
  }
  if (j < steps) step(even, j);
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * N, _mm512_add_ps(even[m], odd[m]));
}

// tile(m0, rows) for each group of up to WIDE_ROWS rows, rows a compile-time constant.
template <typename Tile>
void wide_groups(int64_t M, Tile tile) {
  for (int64_t m0 = 0; m0 < M; m0 += WIDE_ROWS) {
    switch (std::min<int64_t>(WIDE_ROWS, M - m0)) {
#define C(m) case m: tile(m0, std::integral_constant<int, m>{}); break;
      C(1) C(2) C(3) C(4) C(5) C(6) C(7) C(8) C(9) C(10) C(11) C(12)
#undef C
    }
  }
}

// int8 weights with AVX-512: one 16-channel vector per k, widened 16 bytes at a time.
template <>
void block<int8_t>(const float* x, int64_t M, int64_t K, const int8_t* w, float* y, int64_t N) {
  wide_groups(M, [&](int64_t m0, auto rows) {
    constexpr int G = decltype(rows)::value;
    const float* xs = x + m0 * K;
    two_chains<G>(K, y + m0 * N, N, [&](__m512* acc, int64_t k) {
      const int8_t* p = w + k * R;
      _mm_prefetch(reinterpret_cast<const char*>(p) + AHEAD, _MM_HINT_T0);
      __m512 wk = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      for (int m = 0; m < G; ++m) acc[m] = _mm512_fmadd_ps(wk, _mm512_set1_ps(xs[m * K + k]), acc[m]);
    });
  });
}
#endif

#ifdef __AVX512BF16__
// bf16 x (its bits) against bf16 weights in the pair layout: one vdpbf16ps per k-pair and row.
void block(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N) {
  wide_groups(M, [&](int64_t m0, auto rows) {
    constexpr int G = decltype(rows)::value;
    const uint16_t* xs = x + m0 * K;
    two_chains<G>(K / 2, y + m0 * N, N, [&](__m512* acc, int64_t j) {
      const uint16_t* p = w + j * 2 * R;
      _mm_prefetch(reinterpret_cast<const char*>(p) + AHEAD, _MM_HINT_T0);
      __m512bh wj = (__m512bh)_mm512_loadu_si512(p);
      for (int m = 0; m < G; ++m) {
        int32_t pair;
        std::memcpy(&pair, xs + m * K + 2 * j, sizeof pair);
        acc[m] = _mm512_dpbf16_ps(acc[m], wj, (__m512bh)_mm512_set1_epi32(pair));
      }
    });
  });
}
#endif

// Whether a weight of this dtype and K is packed in pairs for the bf16-x block.
bool pairs(torch::ScalarType t, int64_t K) {
#ifdef __AVX512BF16__
  return t == torch::kBFloat16 && K % 2 == 0;
#else
  return false;
#endif
}

}  // namespace

bool supported(torch::ScalarType t) { return t == torch::kFloat || t == torch::kBFloat16; }

torch::Tensor pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && (supported(w.scalar_type()) || w.scalar_type() == torch::kChar),
              "pack: a 2-D float32, bfloat16 or int8 weight");
  int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % R == 0, "pack: output channels not a multiple of 16");
  if (pairs(w.scalar_type(), K))  // (N / 16, K / 2, 32): [b][j][r][2] = W[16 b + r][2 j + i]
    return w.reshape({N / R, R, K / 2, 2}).permute({0, 2, 1, 3}).reshape({N / R, K / 2, 2 * R});
  return w.view({N / R, R, K}).transpose(1, 2).contiguous();
}

// int8 packed weights: x float32 or bfloat16, y in float32 before the per-channel scale (the
// caller's, lab.engine.smallm.linear_int8).
torch::Tensor linear(torch::Tensor x, torch::Tensor packed) {
  auto dtype = packed.scalar_type();
  bool int8 = dtype == torch::kChar;
  TORCH_CHECK(int8 ? supported(x.scalar_type()) : supported(dtype) && x.scalar_type() == dtype,
              "linear: input and packed weight both float32 or both bfloat16 (or int8 weight)");
  int64_t K = x.size(-1);
  bool dp = pairs(dtype, K);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == (dp ? K / 2 : K) &&
                  packed.size(2) == (dp ? 2 * R : R),
              "linear: packed weight does not match the input's features");
  int64_t N = packed.size(0) * R;
  // The pair layout reads x as bf16; every other path widens it to fp32 once (M x K).
  auto rows = (dp ? x : x.to(torch::kFloat)).reshape({-1, K}).contiguous();
  int64_t M = rows.size(0);
  auto y = torch::empty({M, N}, rows.options().dtype(torch::kFloat));
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* xp, const auto* wp) {
    at::parallel_for(0, N / R, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) block(xp, M, K, wp + b * R * K, yp + b * R, N);
    });
  };
  auto bits = [](const torch::Tensor& t) {
    return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
  };
  if (dp) {
#ifdef __AVX512BF16__  // pairs() is false without it
    run(bits(rows), bits(packed));
#endif
  } else if (dtype == torch::kFloat) {
    run(rows.data_ptr<float>(), packed.data_ptr<float>());
  } else if (int8) {
    run(rows.data_ptr<float>(), packed.data_ptr<int8_t>());
  } else {
    run(rows.data_ptr<float>(), bits(packed));
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  if (int8) return y.view(shape);
  return y.to(dtype).view(shape);  // bf16: rounded to nearest even, as torch rounds
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack);
  m.def("linear", &linear);
}
