// y = x W^T (fp32) for a few rows of x, on W packed as [N / 16][K][16]: blocks of 16 output
// channels stored k-major, so each thread streams its blocks in address order, one 64-byte
// line per k gives 16 channels' weights, x[m][k] is broadcast, and no horizontal sums are
// needed. Each output is one fp32 FMA chain over k in order, whatever the number of rows: a
// 1-row decode and a K+1-row verification round alike (batch-invariant), which keeps greedy
// speculation bit-exact against the greedy baseline on this path. AVX2 + FMA (8-float vectors).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int64_t R = 16;        // output channels per packed block
constexpr int64_t VEC = 8;       // floats per vector
constexpr int64_t AHEAD = 2048;  // prefetch distance in floats (8 KiB ahead in the stream)

typedef float vf __attribute__((vector_size(32)));
typedef float vfu __attribute__((vector_size(32), aligned(4)));

// M rows x V vectors of one block, from vector `first` of its 16 channels.
template <int M, int V>
void tile(const float* x, int64_t K, const float* block, int first, float* y, int64_t N) {
  vf acc[V][M];
  for (int v = 0; v < V; ++v)
    for (int m = 0; m < M; ++m) acc[v][m] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const float* p = block + k * R + first * VEC;
    _mm_prefetch(reinterpret_cast<const char*>(p + AHEAD), _MM_HINT_T0);
    vf w[V];
    for (int v = 0; v < V; ++v) w[v] = *reinterpret_cast<const vf*>(p + v * VEC);
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
void block(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
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

}  // namespace

torch::Tensor pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat, "pack: a 2-D float32 weight");
  int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % R == 0, "pack: output channels not a multiple of 16");
  return w.view({N / R, R, K}).transpose(1, 2).contiguous();
}

torch::Tensor linear(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && packed.scalar_type() == torch::kFloat,
              "linear: float32 input and packed weight");
  int64_t K = x.size(-1);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K && packed.size(2) == R,
              "linear: packed weight does not match the input's features");
  auto rows = x.reshape({-1, K}).contiguous();
  int64_t M = rows.size(0), N = packed.size(0) * R;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = rows.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / R, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block(xp, M, K, wp + b * R * K, yp + b * R, N);
  });
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack);
  m.def("linear", &linear);
}
