// Packed-layout small-M linear: W packed as [N/R][K][R] (R = VEC * V rows per block), so each thread
// streams its blocks sequentially; x[m][k] is broadcast; no horizontal sums. VEC: lanes per vector.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#ifndef VEC
#define VEC 16
#endif
typedef float vf __attribute__((vector_size(VEC * 4)));
typedef float vfu __attribute__((vector_size(VEC * 4), aligned(4)));
static inline vf ld(const float* p) { return *reinterpret_cast<const vf*>(p); }

torch::Tensor pack(torch::Tensor w, int64_t R) {
  int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % R == 0, "rows not a multiple of the block");
  return w.view({N / R, R, K}).transpose(1, 2).contiguous();
}

template <int M, int V, int HINT>
static void block(const float* x, const float* wp, int64_t K, int64_t N, int64_t n0, float* y, int64_t pf) {
  constexpr int R = VEC * V;
  vf acc[V][M];
  for (int v = 0; v < V; ++v) for (int m = 0; m < M; ++m) acc[v][m] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const float* p = wp + k * R;
    // one prefetch per 64-byte line of this k step's R floats
    for (int l = 0; l < R * 4; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + pf) + l, (_mm_hint)HINT);
    vf w[V];
    for (int v = 0; v < V; ++v) w[v] = ld(p + v * VEC);
    for (int m = 0; m < M; ++m) {
      vf xb = vf{} + x[m * K + k];
      for (int v = 0; v < V; ++v) acc[v][m] += w[v] * xb;
    }
  }
  for (int m = 0; m < M; ++m) for (int v = 0; v < V; ++v)
    *reinterpret_cast<vfu*>(y + m * N + n0 + v * VEC) = acc[v][m];
}

template <int M, int V, int HINT>
static void run(const float* x, const float* wp, int64_t K, int64_t N, float* y, int64_t pf) {
  constexpr int R = VEC * V;
  at::parallel_for(0, N / R, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block<M, V, HINT>(x, wp + b * R * K, K, N, b * R, y, pf);
  });
}

template <int M>
static void dispatch(const float* x, const float* w, int64_t K, int64_t N, float* y, int64_t V, int64_t pf, int64_t hint) {
  if (hint == 0) { if (V == 2) run<M, 2, _MM_HINT_T0>(x, w, K, N, y, pf); else run<M, 4, _MM_HINT_T0>(x, w, K, N, y, pf); }
  else { if (V == 2) run<M, 2, _MM_HINT_T1>(x, w, K, N, y, pf); else run<M, 4, _MM_HINT_T1>(x, w, K, N, y, pf); }
}

torch::Tensor linear(torch::Tensor x, torch::Tensor wp, int64_t V, int64_t pf, int64_t hint) {
  int64_t K = x.size(-1);
  auto x2 = x.reshape({-1, K}).contiguous();
  int64_t M = x2.size(0), N = wp.numel() / K;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x2.data_ptr<float>(); const float* w = wp.data_ptr<float>(); float* yp = y.data_ptr<float>();
  switch (M) {
#define C(m) case m: dispatch<m>(xp, w, K, N, yp, V, pf, hint); break;
    C(1) C(2) C(3) C(4) C(5) C(6) C(7) C(8) C(9)
#undef C
    default: TORCH_CHECK(false, "rows");
  }
  auto shape = x.sizes().vec(); shape.back() = N;
  return y.view(shape);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("linear", &linear); m.def("pack", &pack); }
