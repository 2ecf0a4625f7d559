"""C++/OpenMP source of the fused CPU kernels (float32), compiled on first use by ``cpu.py``.

Kept as a Python string so that it ships with the package without package-data rules. Every
kernel is one pass over dense memory: the forward reads ``x`` and writes ``y``; the backward
reads ``x`` and ``g``, writes ``dx`` and reduces the two parameter sums. The loops are written
with GCC/Clang vector extensions (16 floats where AVX-512 is there, else 8; the compiler maps
them to AVX-512/AVX/NEON or scalar code), so vectorisation does not depend on the
auto-vectoriser. A tail shorter than a vector is copied into a zero-padded block (zeros add
nothing to the sums). Each sum is accumulated in float32 lanes over a block of at most 16
vectors and every block's lanes are added into float64 lanes (per thread), then added up in a
fixed order: deterministic for a given thread count. Widening every vector to float64 made the
backward pass 1.25-1.8x slower (docs/speed.md), and 16 float32 terms per lane lose far less
than the float32 sums of the reference.

Element formulas (identical to ``functional_reference.py``; see ``functional.py``):

* ``rha(v) = copysign(trunc(|v| + h), v)``, ``h = 0.49999997`` (the float below 1/2): C
  ``roundf`` (half away from zero) bit for bit for every non-NaN float; ``trunc`` is one
  ``vroundps`` with AVX, else an int32 round trip for ``t < 2^23`` (larger floats are integers
  already).
* ``c / d_q`` is ``c * (1 / d_q)`` when ``d_q`` is a power of two whose reciprocal is a float
  (every ``pow2_step`` quantizer): the product is the same real number as the quotient, so it
  rounds to the same float, and a multiply is several times cheaper than a divide.
* ``pow2mag(a) = 2^round(log2 a)`` for ``a >= 0``, decided on the bits: ``a = m 2^e`` rounds up
  iff ``m >= 1.41421366`` (the float above sqrt 2), so the threshold is exactly the geometric
  mean; ``0 -> 0``, ``inf -> inf``, ``NaN -> NaN``; subnormals are rescaled by ``2^24``.
* The pruning threshold of pow-2 with zero is the smallest float ``>= x_min * (1/sqrt 2)``
  (product in double), so ``a >= thr`` is the reference's float64 comparison.

Compiled with ``-ffp-contract=off`` (no FMA contraction: ``y - c`` must round ``y`` first).
"""

SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
#define MIXQ_VBYTES 64
#else
#define MIXQ_VBYTES 32
#endif
typedef float vf __attribute__((vector_size(MIXQ_VBYTES)));
typedef int32_t vi __attribute__((vector_size(MIXQ_VBYTES)));
typedef uint32_t vu __attribute__((vector_size(MIXQ_VBYTES)));
typedef double vd __attribute__((vector_size(2 * MIXQ_VBYTES)));
constexpr int V = MIXQ_VBYTES / 4;
constexpr int kBlock = 16;  // vectors summed in float32 before a float64 accumulation
constexpr int64_t kGrain = 32768;  // elements below which one thread is used (as ATen)

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf sp(float s) { return vf{} + s; }
inline vf sel(vi m, vf a, vf b) { return m ? a : b; }
inline vd wide(vf v) { return __builtin_convertvector(v, vd); }

// trunc(t) for t >= 0 (NaN stays NaN): one instruction with AVX, else an int32 round trip
// below 2^23 (larger floats are integers already).
inline vf trunc_pos(vf t) {
#if defined(__AVX512F__)
  return (vf)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  return (vf)_mm256_round_ps((__m256)t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
#else
  const vi small = t < 8388608.0f;  // false for NaN
  const vf tr = __builtin_convertvector(__builtin_convertvector(sel(small, t, sp(0.0f)), vi), vf);
  return sel(small, tr, t);
#endif
}

inline vf rha(vf v) {
  const vu b = (vu)v;
  const vf t = (vf)(b & 0x7FFFFFFFu) + 0.49999997f;
  return (vf)((vu)trunc_pos(t) | (b & 0x80000000u));
}

inline vf pow2mag(vf a) {
  const vi sub = a < 1.17549435e-38f;  // zero or subnormal
  const vu b = (vu)sel(sub, a * 16777216.0f, a);
  const vu up = (vu)((b & 0x7FFFFFu) >= 0x3504F4u) & 0x800000u;
  vf p = (vf)((b & 0x7F800000u) + up);
  p = sel(sub, p * 5.9604644775390625e-08f, p);
  return sel(a != a, a, p);
}

inline vf clip(vf x, float lo, float hi) {
  vf c = sel(x <= lo, sp(lo), x);  // NaN stays NaN, as torch.maximum / minimum
  return sel(c > hi, sp(hi), c);
}

// min(x, cap) as torch.clamp(x, max=cap): NaN stays NaN.
inline vf cap1(vf x, float cap) { return sel(x > cap, sp(cap), x); }

// c / dq, as c * (1 / dq) when R: dq is a power of two whose reciprocal is a float, so the
// product is the same real number as the quotient and rounds to the same float.
template <bool R>
inline vf over(vf c, float dq, float inv) { return R ? c * inv : c / dq; }

template <bool S, bool C, bool R>
inline vf ufwd1(vf x, float dq, float inv, float hi, float cap) {
  if (C) x = cap1(x, cap);
  return rha(over<R>(clip(x, S ? -hi : 0.0f, hi), dq, inv)) * dq;
}

// With C the input is min(x, cap) first; its gradient passes where x <= cap (as clamp's).
template <bool S, bool GX, bool C, bool R>
inline void ubwd1(vf x, vf g, vf* gx, float dq, float inv, float hi, float cap, vf* a0,
                  vf* a1) {
  const float lo = S ? -hi : 0.0f;
  const vi keep = C ? (x <= cap) : vi{};
  if (C) x = cap1(x, cap);
  const vi ho = x >= hi, lw = x <= lo;
  if (GX) *gx = sel(ho | lw, sp(0.0f), g);
  if (GX && C) *gx = sel(keep, *gx, sp(0.0f));
  const vf c = clip(x, lo, hi);
  const vf yq = rha(over<R>(c, dq, inv)) * dq;
  *a0 += g * (yq - c);
  const vf one = sp(1.0f), zero = sp(0.0f);
  const vf sg = S ? sel(ho, one, zero) - sel(lw, one, zero) : sel(ho, one, zero);
  *a1 += g * sg;
}

template <bool S>
inline vf magnitude(vf x) { return S ? (vf)((vu)x & 0x7FFFFFFFu) : sel(x <= 0.0f, sp(0.0f), x); }

template <bool S, bool Z, bool C>
inline vf pfwd1(vf x, float xmin, float xmax, float thr, float cap) {
  if (C) x = cap1(x, cap);
  const vf a = magnitude<S>(x);
  vf m = pow2mag(a);
  m = sel(m <= xmin, sp(xmin), m);
  m = sel(m >= xmax, sp(xmax), m);  // NaN stays NaN
  if (Z) m = sel(a >= thr, m, sp(0.0f));
  return S ? sel(x < 0.0f, -m, m) : m;
}

template <bool S, bool Z, bool GX, bool C>
inline void pbwd1(vf x, vf g, vf* gx, float xmin, float xmax, float thr, float cap, vf* a0,
                  vf* a1) {
  const vi keep = C ? (x <= cap) : vi{};
  if (C) x = cap1(x, cap);
  const vf a = magnitude<S>(x);
  const vf gs = S ? sel(x < 0.0f, -g, g) : g;
  const vi r3 = a >= xmax, below = a < xmin;
  const vi r1 = Z ? (below & (a >= thr)) : below;
  const vi r2 = ~(r3 | below);
  if (GX) *gx = sel(r2, (g * pow2mag(a)) / sel(r2, a, sp(1.0f)), sp(0.0f));
  if (GX && C) *gx = sel(keep, *gx, sp(0.0f));
  *a0 += sel(r1, gs, sp(0.0f));
  *a1 += sel(r3, gs, sp(0.0f));
}

// Apply f(x_block) -> y_block over [lo, hi), the tail through a zero-padded block.
template <typename F>
inline void map1(const float* x, float* y, int64_t lo, int64_t hi, F f) {
  int64_t i = lo;
  for (; i + V <= hi; i += V) st(y + i, f(ld(x + i)));
  if (i < hi) {
    float bx[V] = {0}, by[V];
    std::memcpy(bx, x + i, (hi - i) * sizeof(float));
    st(by, f(ld(bx)));
    std::memcpy(y + i, by, (hi - i) * sizeof(float));
  }
}

// Apply f(x, g, &gx, &f0, &f1) over [lo, hi); gx may be null (no input gradient). f adds to
// the float32 lanes f0, f1, which go into the float64 lanes after every kBlock vectors.
template <typename F>
inline void map2(const float* x, const float* g, float* gx, int64_t lo, int64_t hi,
                 double* s0, double* s1, F f) {
  vd a0 = {0}, a1 = {0};
  int64_t i = lo;
  vf out;
  const int64_t full = lo + (hi - lo) / V * V;
  while (i < full) {
    const int64_t end = full - i < kBlock * V ? full : i + kBlock * V;
    vf f0 = {0}, f1 = {0};
    for (; i < end; i += V) {
      f(ld(x + i), ld(g + i), &out, &f0, &f1);
      if (gx) st(gx + i, out);
    }
    a0 += wide(f0);
    a1 += wide(f1);
  }
  if (i < hi) {
    float bx[V] = {0}, bg[V] = {0}, bo[V];
    std::memcpy(bx, x + i, (hi - i) * sizeof(float));
    std::memcpy(bg, g + i, (hi - i) * sizeof(float));
    vf f0 = {0}, f1 = {0};
    f(ld(bx), ld(bg), &out, &f0, &f1);
    a0 += wide(f0);
    a1 += wide(f1);
    st(bo, out);
    if (gx) std::memcpy(gx + i, bo, (hi - i) * sizeof(float));
  }
  double r0 = 0.0, r1 = 0.0;
  for (int j = 0; j < V; ++j) { r0 += a0[j]; r1 += a1[j]; }
  *s0 = r0;
  *s1 = r1;
}

inline int threads_for(int64_t n, int nt) {
#ifdef _OPENMP
  return (nt <= 1 || n < kGrain) ? 1 : nt;
#else
  (void)n; (void)nt;
  return 1;
#endif
}

// Run body(t, lo, hi) on k threads with static chunks aligned to 64 elements.
template <typename B>
void parallel(int64_t n, int k, B body) {
#ifdef _OPENMP
  if (k <= 1) { body(0, 0, n); return; }
#pragma omp parallel num_threads(k)
  {
    const int t = omp_get_thread_num(), kk = omp_get_num_threads();
    const int64_t per = ((n + kk - 1) / kk + 63) / 64 * 64;
    const int64_t lo = per * t < n ? per * t : n;
    const int64_t hi = lo + per < n ? lo + per : n;
    body(t, lo, hi);
  }
#else
  (void)k;
  body(0, 0, n);
#endif
}

// Per-thread partial sums, added in thread order.
struct Partials {
  std::vector<double> v;
  explicit Partials(int k) : v(2 * (size_t)k, 0.0) {}
  double* at(int t) { return &v[2 * (size_t)t]; }
  void total(double* s0, double* s1) const {
    *s0 = 0.0; *s1 = 0.0;
    for (size_t t = 0; t < v.size(); t += 2) { *s0 += v[t]; *s1 += v[t + 1]; }
  }
};

// Smallest float >= xmin * (1/sqrt 2) computed in double.
inline float zero_threshold(float xmin) {
  const double t = (double)xmin * 0.70710678118654757;
  float f = (float)t;
  if ((double)f < t) f = std::nextafter(f, INFINITY);
  return f;
}

// 1 / dq when dq is a power of two with a float reciprocal (exactly), else 0.
inline float exact_inverse(float dq) {
  int e;
  if (!(dq > 0.0f) || !std::isfinite(dq) || std::frexp(dq, &e) != 0.5f) return 0.0f;
  const float inv = 1.0f / dq;
  return (std::isfinite(inv) && inv * dq == 1.0f) ? inv : 0.0f;
}

template <bool S, bool C, bool R>
void ufwd_run(const float* x, float* y, int64_t n, float dq, float inv, float hi, float cap,
              int nt) {
  parallel(n, threads_for(n, nt), [=](int, int64_t lo, int64_t up) {
    map1(x, y, lo, up, [=](vf v) { return ufwd1<S, C, R>(v, dq, inv, hi, cap); });
  });
}

template <bool S, bool C>
void ufwd_any(const float* x, float* y, int64_t n, float dq, float hi, float cap, int nt) {
  const float inv = exact_inverse(dq);
  if (inv != 0.0f) ufwd_run<S, C, true>(x, y, n, dq, inv, hi, cap, nt);
  else ufwd_run<S, C, false>(x, y, n, dq, inv, hi, cap, nt);
}

template <bool S, bool GX, bool C, bool R>
void ubwd_run(const float* x, const float* g, float* gx, int64_t n, float dq, float inv,
              float hi, float cap, int nt, double* s0, double* s1) {
  const int k = threads_for(n, nt);
  Partials part(k);
  Partials* pp = &part;
  parallel(n, k, [=](int t, int64_t lo, int64_t up) {
    map2(x, g, gx, lo, up, pp->at(t), pp->at(t) + 1,
         [=](vf xv, vf gv, vf* o, vf* a0, vf* a1) {
           ubwd1<S, GX, C, R>(xv, gv, o, dq, inv, hi, cap, a0, a1);
         });
  });
  part.total(s0, s1);
}

template <bool S, bool GX, bool C>
void ubwd_any(const float* x, const float* g, float* gx, int64_t n, float dq, float hi,
              float cap, int nt, double* s0, double* s1) {
  const float inv = exact_inverse(dq);
  if (inv != 0.0f) ubwd_run<S, GX, C, true>(x, g, gx, n, dq, inv, hi, cap, nt, s0, s1);
  else ubwd_run<S, GX, C, false>(x, g, gx, n, dq, inv, hi, cap, nt, s0, s1);
}

template <bool S, bool Z, bool C>
void pfwd_run(const float* x, float* y, int64_t n, float xmin, float xmax, float cap, int nt) {
  const float thr = zero_threshold(xmin);
  parallel(n, threads_for(n, nt), [=](int, int64_t lo, int64_t up) {
    map1(x, y, lo, up, [=](vf v) { return pfwd1<S, Z, C>(v, xmin, xmax, thr, cap); });
  });
}

template <bool S, bool Z, bool GX, bool C>
void pbwd_run(const float* x, const float* g, float* gx, int64_t n, float xmin, float xmax,
              float cap, int nt, double* s0, double* s1) {
  const float thr = zero_threshold(xmin);
  const int k = threads_for(n, nt);
  Partials part(k);
  Partials* pp = &part;
  parallel(n, k, [=](int t, int64_t lo, int64_t up) {
    map2(x, g, gx, lo, up, pp->at(t), pp->at(t) + 1,
         [=](vf xv, vf gv, vf* o, vf* a0, vf* a1) {
           pbwd1<S, Z, GX, C>(xv, gv, o, xmin, xmax, thr, cap, a0, a1);
         });
  });
  part.total(s0, s1);
}

}  // namespace

// Instantiate F for a capped (capp non-null) or an uncapped input.
#define MIXQ_CAP(F) \
  if (capp) { F(true) } else { F(false) }

extern "C" {

int mixq_abi_version() { return 3; }

// capp: null, or the cap of min(x, *capp) applied before quantizing (a fused ReLU6).
void mixq_uniform_fwd(const float* x, float* y, int64_t n, const float* dqp, const float* hip,
                      int is_signed, const float* capp, int nt) {
  const float cap = capp ? *capp : 0.0f;
#define MIXQ_UF(C)                                                               \
  if (is_signed) ufwd_any<true, C>(x, y, n, *dqp, *hip, cap, nt);                \
  else ufwd_any<false, C>(x, y, n, *dqp, *hip, cap, nt);
  MIXQ_CAP(MIXQ_UF)
#undef MIXQ_UF
}

// out[0] = sum g (y - c) / d_q, out[1] = sum g * out_sign (float32 results).
void mixq_uniform_bwd(const float* x, const float* g, float* gx, int64_t n, const float* dqp,
                      const float* hip, int is_signed, const float* capp, float* out, int nt) {
  const float dq = *dqp, hi = *hip, cap = capp ? *capp : 0.0f;
  double s0, s1;
#define MIXQ_UB(C)                                                                   \
  if (is_signed) {                                                                   \
    if (gx) ubwd_any<true, true, C>(x, g, gx, n, dq, hi, cap, nt, &s0, &s1);          \
    else ubwd_any<true, false, C>(x, g, gx, n, dq, hi, cap, nt, &s0, &s1);            \
  } else {                                                                           \
    if (gx) ubwd_any<false, true, C>(x, g, gx, n, dq, hi, cap, nt, &s0, &s1);         \
    else ubwd_any<false, false, C>(x, g, gx, n, dq, hi, cap, nt, &s0, &s1);           \
  }
  MIXQ_CAP(MIXQ_UB)
#undef MIXQ_UB
  out[0] = (float)s0 / dq;
  out[1] = (float)s1;
}

void mixq_pow2_fwd(const float* x, float* y, int64_t n, const float* minp, const float* maxp,
                   int is_signed, int with_zero, const float* capp, int nt) {
  const float a = *minp, b = *maxp, cap = capp ? *capp : 0.0f;
#define MIXQ_PF(C)                                                              \
  if (is_signed) {                                                              \
    if (with_zero) pfwd_run<true, true, C>(x, y, n, a, b, cap, nt);              \
    else pfwd_run<true, false, C>(x, y, n, a, b, cap, nt);                       \
  } else {                                                                      \
    if (with_zero) pfwd_run<false, true, C>(x, y, n, a, b, cap, nt);             \
    else pfwd_run<false, false, C>(x, y, n, a, b, cap, nt);                      \
  }
  MIXQ_CAP(MIXQ_PF)
#undef MIXQ_PF
}

// out[0] = sum_{R1} g s, out[1] = sum_{R3} g s.
void mixq_pow2_bwd(const float* x, const float* g, float* gx, int64_t n, const float* minp,
                   const float* maxp, int is_signed, int with_zero, const float* capp,
                   float* out, int nt) {
  const float a = *minp, b = *maxp, cap = capp ? *capp : 0.0f;
  double s0, s1;
#define MIXQ_PB(S, Z, C)                                                     \
  if (gx) pbwd_run<S, Z, true, C>(x, g, gx, n, a, b, cap, nt, &s0, &s1);      \
  else pbwd_run<S, Z, false, C>(x, g, gx, n, a, b, cap, nt, &s0, &s1);
#define MIXQ_PBC(C)                                                          \
  if (is_signed) {                                                           \
    if (with_zero) { MIXQ_PB(true, true, C) } else { MIXQ_PB(true, false, C) } \
  } else {                                                                   \
    if (with_zero) { MIXQ_PB(false, true, C) } else { MIXQ_PB(false, false, C) } \
  }
  MIXQ_CAP(MIXQ_PBC)
#undef MIXQ_PBC
#undef MIXQ_PB
  out[0] = (float)s0;
  out[1] = (float)s1;
}

}  // extern "C"
"""
