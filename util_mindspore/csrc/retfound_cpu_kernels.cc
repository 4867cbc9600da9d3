// --------------------------------------------------------
// RETFound for MindSpore: fused fp32 CPU kernels for the ViT hot spots, loaded as MindSpore
// AOT custom operators (ops.Custom(func_type="aot")) by util_mindspore/cpu_kernels.py.
// Written for this port (docs/performance.md explains why: MindSpore 2.10's CPU LayerNormGrad,
// BiasAddGrad, Erf, softmax-backward ReduceSum and StridedSlice kernels cost ~3 s of a 7.7 s
// ViT-B/16 batch-8 train step, against GEMMs of ~4.5 s).
//
// Every entry point has MindSpore's AOT signature
//   int f(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
//         void *stream, void *extra)
// with params = inputs then outputs; it returns non-zero (MindSpore raises) on a dtype or shape
// it does not handle. The arithmetic follows torch's CPU kernels:
//   * erf: Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7), the approximation ATen's
//     vectorised float erf uses for torch.nn.GELU on CPU;
//   * exp: Cody-Waite range reduction + degree-7 Taylor polynomial (< 2 ulp on the range used);
//   * LayerNorm: two-pass mean/variance per row, biased variance, rstd = 1/sqrt(var + eps);
//   * softmax over the last axis with max subtraction;
//   * Linear layers (x @ W^T + b and its three gradients) call oneDNN's GEMMs from the libdnnl
//     MindSpore itself ships and has loaded (dnnl_sgemm, and dnnl_gemm_bf16bf16f32 for the bf16
//     matmul mode: bf16 inputs rounded to nearest even, fp32 accumulation and outputs).
// Loops are written for the compiler's auto-vectoriser (#pragma omp simd, compiled with
// -fopenmp-simd: no OpenMP runtime) and split over a small pool of worker threads that poll for
// 300 us after a call, then block (see Pool). OpenMP is deliberately not used: MindSpore has
// already loaded and initialised libgomp, whose idle threads spin for much longer
// (OMP_WAIT_POLICY can no longer be changed) and slowed MindSpore's own GEMMs by ~15%. Results
// do not depend on the number of threads (no cross-thread reductions).
// --------------------------------------------------------
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <condition_variable>
#include <dlfcn.h>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <sched.h>
#include <string>
#include <system_error>
#include <thread>
#include <sys/types.h>
#include <type_traits>
#include <unistd.h>
#include <vector>
#if defined(__AVX512F__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*() (GCC bug 105593)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define RF_AVX512 1
#endif

namespace {

inline int64_t Numel(int nd, const int64_t *s) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= s[i];
  return n;
}

// The last dimension; -1 for a rank-0 tensor, which every caller's shape check then rejects.
inline int64_t LastDim(int nd, const int64_t *s) { return nd > 0 ? s[nd - 1] : -1; }

// How many rows of `width` elements `total` holds: 0 for an empty row (never a division by zero:
// MindSpore does launch operators on empty tensors).
inline int64_t RowsOf(int64_t total, int64_t width) { return width > 0 ? total / width : 0; }

inline bool IsF32(const char *dtype) { return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0; }

inline bool AllF32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (!IsF32(dtypes[i])) return false;
  }
  return true;
}

// The parameters' dtypes, one letter each: 'f' float32, 'b' bfloat16 (kinds has nparam letters).
inline bool DtypesAre(int nparam, const char **dtypes, const char *kinds) {
  if (static_cast<int>(std::strlen(kinds)) != nparam) return false;
  for (int i = 0; i < nparam; ++i) {
    if (kinds[i] == 'b' ? std::strcmp(dtypes[i], "bfloat16") != 0 : !IsF32(dtypes[i])) return false;
  }
  return true;
}

// ------------------------------------------------------------------ thread pool
// Run(n, fn) calls fn(begin, end) on disjoint ranges covering [0, n), the caller taking the first.
// A call made while another is running (MindSpore may launch kernels from several threads) runs
// inline on its own thread.
// Waiting: a worker that has finished, and a caller waiting for its workers, first poll for a
// short while (300 us by default; RETFOUND_KERNEL_SPIN_US or RfPoolSpinUs() change it, 0 = block
// at once) and only then block on a condition variable. Waking a blocked thread took ~50 us on
// the 2-core VM this was measured on; a ViT-L/16 forward makes ~350 pool calls, and 85% of the
// gaps between them were under 300 us (median 49 us), so the next call usually finds the worker
// still polling (a no-op call: 45 us -> 0.5 us). The poll yields the CPU every 64 checks, so a
// thread MindSpore wakes meanwhile is not kept waiting.
class Pool {
 public:
  static Pool &Get() {
    static Pool *pool = new Pool();  // never destroyed: workers may outlive static destructors
    return *pool;
  }

  // the poll before blocking, in microseconds (clamped to [0, 100000]); returns the previous value
  long SetSpinUs(long us) {
    return spin_ns_.exchange(std::max(0L, std::min(us, 100000L)) * 1000) / 1000;
  }
  long SpinUs() const { return spin_ns_.load(std::memory_order_relaxed) / 1000; }

  void Run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)> &fn) {
    int64_t parts = std::min<int64_t>(threads_, (n + grain - 1) / std::max<int64_t>(grain, 1));
    // Inline: one part; a call nested in a pool call on this thread (a thread must not try_lock a
    // mutex it holds); a forked child (the workers were not copied by fork(), and the parent's
    // locks may be held in the child's copy).
    if (parts <= 1 || in_run_ || getpid() != pid_) {
      if (n > 0) fn(0, n);
      return;
    }
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) {
      fn(0, n);
      return;
    }
    struct InRun {  // set while this thread runs its part (reset on exceptions too)
      InRun() { in_run_ = true; }
      ~InRun() { in_run_ = false; }
    } in_run;
    {
      std::lock_guard<std::mutex> lk(mutex_);
      fn_ = &fn;
      n_ = n;
      parts_ = parts;
      pending_.store(parts - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      if (sleepers_ > 0) wake_.notify_all();
    }
    fn(0, n / parts);
    if (!Poll([this] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(mutex_);
      done_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    fn_ = nullptr;
  }

 private:
  Pool() : pid_(getpid()) {
    int count = 0;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) count = CPU_COUNT(&set);
    if (count <= 0) count = static_cast<int>(std::thread::hardware_concurrency());
    if (const char *env = std::getenv("RETFOUND_KERNEL_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) count = v;
    }
    count = std::max(1, std::min(count, 256));
    spin_ns_ = 300000;
    if (const char *env = std::getenv("RETFOUND_KERNEL_SPIN_US")) {
      const long v = std::atol(env);
      if (v >= 0) SetSpinUs(v);
    }
    threads_ = 1;
    for (int i = 1; i < count; ++i) {
      try {
        std::thread([this, i] { Loop(i); }).detach();
      } catch (const std::system_error &) {
        break;  // fewer threads than asked for: still correct
      }
      threads_ = i + 1;
    }
  }

  // true as soon as ready() holds, false when spin_ns_ passed without it
  template <typename R>
  bool Poll(R ready) const {
    if (ready()) return true;
    const long spin_ns = spin_ns_.load(std::memory_order_relaxed);
    if (spin_ns <= 0) return false;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 1;; ++i) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if (ready()) return true;
      if ((i & 63) == 0) {
        if (std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count() >
            spin_ns)
          return false;
        sched_yield();
      }
    }
  }

  void Loop(int64_t idx) {
    uint64_t seen = 0;
    for (;;) {
      Poll([&] { return generation_.load(std::memory_order_acquire) != seen; });
      std::unique_lock<std::mutex> lk(mutex_);
      if (generation_.load(std::memory_order_relaxed) == seen) {
        ++sleepers_;
        wake_.wait(lk, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        --sleepers_;
      }
      // read the call under the lock: Run() writes it and bumps generation_ under the same lock
      seen = generation_.load(std::memory_order_relaxed);
      if (idx >= parts_) continue;
      const auto *fn = fn_;
      const int64_t begin = n_ * idx / parts_, end = n_ * (idx + 1) / parts_;
      lk.unlock();
      (*fn)(begin, end);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> done(mutex_);  // (Run checks pending_ under this lock)
        done_.notify_one();
      }
    }
  }

  static thread_local bool in_run_;
  const pid_t pid_;
  int threads_ = 1;
  std::atomic<long> spin_ns_{0};
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int64_t)> *fn_ = nullptr;
  int64_t n_ = 0, parts_ = 0, sleepers_ = 0;
  std::atomic<int64_t> pending_{0};
  std::atomic<uint64_t> generation_{0};
};

thread_local bool Pool::in_run_ = false;

template <typename F>
inline void ParallelFor(int64_t n, int64_t grain, F body) {
  const std::function<void(int64_t, int64_t)> fn = body;
  Pool::Get().Run(n, grain, fn);
}

// ParallelFor for bodies that return a status: 0, or the first non-zero status any range returned.
template <typename F>
inline int ParallelStatus(int64_t n, int64_t grain, F body) {
  std::atomic<int> status{0};
  ParallelFor(n, grain, [&](int64_t lo, int64_t hi) {
    const int s = body(lo, hi);
    int none = 0;
    if (s != 0) status.compare_exchange_strong(none, s);
  });
  return status.load();
}

// a * b + c in one rounding where the CPU has FMA (every x86-64 CPU since 2013 and AArch64); a
// CPU without it (-march=native) keeps the two roundings instead of a slow software fma call.
inline float Fma(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) for x in about [-87, 88]; vectorisable (no calls, no branches).
inline float ExpF(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // n = round(x / ln2) with the 1.5 * 2^23 trick (std::floor/nearbyint do not vectorise without
  // -fno-trapping-math); valid for |x / ln2| < 2^22, and never compiled with -ffast-math.
  // Written with fused multiply-adds, the same steps as ExpV below (the library is built with
  // -ffp-contract=off, so only these explicit Fma calls fuse): 17% faster GELU, and the
  // portable softmax now rounds as the AVX-512 one.
  const float n = Fma(x, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
  // ln2 split in a high part exact in float and a low part (Cody-Waite)
  float r = Fma(n, -0.693359375f, x);
  r = Fma(n, 2.12194440e-4f, r);
  float p = 1.0f / 5040.0f;
  p = Fma(p, r, 1.0f / 720.0f);
  p = Fma(p, r, 1.0f / 120.0f);
  p = Fma(p, r, 1.0f / 24.0f);
  p = Fma(p, r, 1.0f / 6.0f);
  p = Fma(p, r, 0.5f);
  p = Fma(p, r, 1.0f);
  p = Fma(p, r, 1.0f);
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, e);
}

// erf(x), Abramowitz & Stegun 7.1.26 with fused multiply-adds, as ATen's Vectorized<float>::erf.
inline float ErfF(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / Fma(0.3275911f, ax, 1.0f);
  float p = 1.061405429f;
  p = Fma(p, t, -1.453152027f);
  p = Fma(p, t, 1.421413741f);
  p = Fma(p, t, -0.284496736f);
  p = Fma(p, t, 0.254829592f);
  const float y = Fma(-p * t, ExpF(-ax * ax), 1.0f);
  return std::copysign(y, x);
}

constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

inline float GeluF(float v) { return v * 0.5f * (1.0f + ErfF(v * kSqrt1_2)); }

inline float GeluGradF(float v) {
  const float cdf = 0.5f * (1.0f + ErfF(v * kSqrt1_2));
  const float pdf = kInvSqrt2Pi * ExpF(-0.5f * v * v);
  return cdf + v * pdf;
}

#ifdef RF_AVX512
// ExpF on 16 lanes: the same steps written with AVX-512 intrinsics (the compiler's
// auto-vectorised softmax loop ran at ~1 ns per element, this one at ~0.5).
inline __m512 ExpV(__m512 x) {
  // The clamp's operand order matters: max/min return their SECOND operand when either is NaN, so
  // x goes second and a NaN stays NaN (as ExpF's std::max/std::min; max(x, c) turned NaN scores
  // into finite probabilities, and an Inf score into a uniform softmax row).
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 big = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), big), big);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// The lanes [0, count) of a 16-lane vector (all of them for count >= 16).
inline __mmask16 LaneMask(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// Horizontal max and sum of 16 lanes (a shuffle tree; GCC 12's _mm512_reduce_* warn under -Wall).
template <typename Op>
inline float Reduce16(__m512 v, Op op) {
  v = op(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = op(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = op(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = op(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}
inline float HMax(__m512 v) { return Reduce16(v, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }); }
inline float HSum(__m512 v) { return Reduce16(v, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); }); }

// Softmax of one row (y may alias x); the tail is a masked vector, not a scalar loop.
inline void SoftmaxRow(const float *x, float *y, int64_t d) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 k = LaneMask(d - j);
    mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, x + j));
  }
  const __m512 m = _mm512_set1_ps(HMax(mv));
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {  // two independent sums
    const __m512 e0 = ExpV(_mm512_sub_ps(_mm512_loadu_ps(x + j), m));
    const __m512 e1 = ExpV(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), m));
    _mm512_storeu_ps(y + j, e0);
    _mm512_storeu_ps(y + j + 16, e1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  for (; j < d; j += 16) {
    const __mmask16 k = LaneMask(d - j);
    const __m512 e = _mm512_maskz_mov_ps(k, ExpV(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), m)));
    _mm512_mask_storeu_ps(y + j, k, e);
    s0 = _mm512_add_ps(s0, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / HSum(_mm512_add_ps(s0, s1)));
  for (j = 0; j < d; j += 16) {
    const __mmask16 k = LaneMask(d - j);
    _mm512_mask_storeu_ps(y + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, y + j), inv));
  }
}
#else
// Softmax of one row (y may alias x).
inline void SoftmaxRow(const float *x, float *y, int64_t d) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < d; ++j) m = std::max(m, x[j]);
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) {
    const float e = ExpF(x[j] - m);
    y[j] = e;
    s += e;
  }
  const float inv = 1.0f / s;
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) y[j] *= inv;
}
#endif

// Softmax gradient of one row: dx = y * (dy - sum(dy * y)) (dx may alias dy).
inline void SoftmaxGradRow(const float *y, const float *dy, float *dx, int64_t d) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) s += y[j] * dy[j];
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) dx[j] = y[j] * (dy[j] - s);
}

// Column sums of a (rows, cols) matrix into out[cols]: threads own column slabs, so the
// result does not depend on the thread count.
void ColSum(const float *x, int64_t rows, int64_t cols, float *out) {
  ParallelFor((cols + 63) / 64, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j0 = lo * 64; j0 < std::min(cols, hi * 64); j0 += 64) {
      const int64_t j1 = std::min(cols, j0 + 64);
      float acc[64] = {0};
      for (int64_t i = 0; i < rows; ++i) {
        const float *row = x + i * cols;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) acc[j - j0] += row[j];
      }
      for (int64_t j = j0; j < j1; ++j) out[j] = acc[j - j0];
    }
  });
}


// ------------------------------------------------------------------ oneDNN GEMMs
// Resolved at run time from the libdnnl.so.3 MindSpore has already loaded (no link-time
// dependency: without it only the Linear kernels are unavailable). Row-major, as oneDNN's API.
typedef int (*SgemmFn)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *,
                       int64_t, float, float *, int64_t);
typedef int (*Bf16GemmFn)(char, char, int64_t, int64_t, int64_t, float, const uint16_t *, int64_t,
                          const uint16_t *, int64_t, float, float *, int64_t);
struct Dnnl {
  SgemmFn sgemm = nullptr;
  Bf16GemmFn bf16 = nullptr;
};

// MindSpore's libdnnl.so.3 (already loaded by MindSpore; nullptr when it cannot be found).
void *DnnlLibrary() {
  static void *const lib = [] {
    void *h = dlopen("libdnnl.so.3", RTLD_NOW | RTLD_NOLOAD);
    return h != nullptr ? h : dlopen("libdnnl.so.3", RTLD_NOW);
  }();
  return lib;
}

const Dnnl &GetDnnl() {
  static const Dnnl dnnl = [] {
    Dnnl d;
    void *h = DnnlLibrary();
    if (h != nullptr) {
      d.sgemm = reinterpret_cast<SgemmFn>(dlsym(h, "dnnl_sgemm"));
      d.bf16 = reinterpret_cast<Bf16GemmFn>(dlsym(h, "dnnl_gemm_bf16bf16f32"));
    }
    return d;
  }();
  return dnnl;
}

// fp32 -> bf16, round to nearest even (as torch's c10::BFloat16); NaN stays NaN.
inline uint16_t ToBf16(float f) {
  const uint32_t b = __builtin_bit_cast(uint32_t, f);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const uint32_t nan = (b >> 16) | 0x40u;
  return static_cast<uint16_t>((b & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// x (n floats) rounded to bf16 into o, on the calling thread.
inline void ToBf16Into(const float *x, uint16_t *o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = ToBf16(x[i]);
}

// x (n floats) rounded to bf16 into o, over the threads; returns o.
inline const uint16_t *ToBf16Parallel(const float *x, uint16_t *o, int64_t n) {
  ParallelFor(n, 1 << 16, [&](int64_t lo, int64_t hi) { ToBf16Into(x + lo, o + lo, hi - lo); });
  return o;
}

// Scratch buffers for bf16 copies, reused across calls: a fresh std::vector per call costs
// page faults and a zero-fill, two extra passes over ViT-L's weights per forward. A lease takes a
// buffer from a shared free list (or makes one) and gives it back when it goes out of scope, so
// the number of buffers is the number in use at once (3 per running Linear kernel), not one set
// per thread that ever launched a kernel. Buffers only grow.
class Bf16Lease {
 public:
  Bf16Lease() {
    std::lock_guard<std::mutex> lock(Mu());
    if (!Free().empty()) {
      buf_ = std::move(Free().back());
      Free().pop_back();
    }
  }
  ~Bf16Lease() {
    std::lock_guard<std::mutex> lock(Mu());
    Free().push_back(std::move(buf_));
  }
  Bf16Lease(const Bf16Lease &) = delete;
  Bf16Lease &operator=(const Bf16Lease &) = delete;

  // x (n floats) rounded to bf16 (nearest even) into this lease's buffer, over the threads.
  const uint16_t *Convert(const float *x, int64_t n) {
    if (buf_.size() < static_cast<size_t>(n)) {
      buf_ = std::vector<uint16_t>();  // free first: never hold the old and the new size at once
      buf_.resize(static_cast<size_t>(n));
    }
    return ToBf16Parallel(x, buf_.data(), n);
  }

 private:
  static std::mutex &Mu() {
    static std::mutex mu;
    return mu;
  }
  static std::vector<std::vector<uint16_t>> &Free() {
    static std::vector<std::vector<uint16_t>> free_list;
    return free_list;
  }
  std::vector<uint16_t> buf_;
};

// The GEMM of a kernel's precision: fp32 (dnnl_sgemm), or bf16 inputs with fp32 accumulation and
// output (dnnl_gemm_bf16bf16f32, the --cpu_bf16 mode). In is the GEMM's input element type.
template <bool kBf16>
struct Precision {
  using In = typename std::conditional<kBf16, uint16_t, float>::type;
  using Fn = typename std::conditional<kBf16, Bf16GemmFn, SgemmFn>::type;
  static Fn Gemm() {
    if constexpr (kBf16) {
      return GetDnnl().bf16;
    } else {
      return GetDnnl().sgemm;
    }
  }
};

// A whole fp32 tensor as a GEMM input of precision kBf16: itself, or rounded to bf16 over the
// threads into a leased scratch buffer (valid while this object lives).
template <bool kBf16>
class GemmInput {
 public:
  const typename Precision<kBf16>::In *Of(const float *x, int64_t n) {
    if constexpr (kBf16) {
      return lease_.Convert(x, n);
    } else {
      return x;
    }
  }

 private:
  struct None {};
  typename std::conditional<kBf16, Bf16Lease, None>::type lease_;
};

// The same for a small block inside a thread-pool task: converted on the calling thread into a
// buffer the task owns (reused for every block of the task).
template <bool kBf16>
class TaskGemmInput {
 public:
  const typename Precision<kBf16>::In *Of(const float *x, int64_t n) {
    if constexpr (kBf16) {
      if (buf_.size() < static_cast<size_t>(n)) buf_.resize(static_cast<size_t>(n));
      ToBf16Into(x, buf_.data(), n);
      return buf_.data();
    } else {
      return x;
    }
  }

 private:
  std::vector<uint16_t> buf_;
};

// A backward kernel's GEMM input of precision kBf16: the forward's saved bf16 copy as it is
// (kSaved), or the fp32 tensor rounded through g (or itself, in fp32).
template <bool kBf16, bool kSaved>
const typename Precision<kBf16>::In *SavedOr(GemmInput<kBf16> &g, const void *param, int64_t n) {
  static_assert(kBf16 || !kSaved, "only bf16 GEMM inputs are saved");
  if constexpr (kSaved) {
    return static_cast<const uint16_t *>(param);
  } else {
    return g.Of(static_cast<const float *>(param), n);
  }
}

// A forward kernel's GEMM input of precision kBf16: x rounded into the op's bf16 output `saved`
// (kSave: the backward takes that copy through SavedOr), or through g (or x itself, in fp32).
template <bool kBf16, bool kSave>
const typename Precision<kBf16>::In *SavingTo(GemmInput<kBf16> &g, const float *x, void *saved, int64_t n) {
  static_assert(kBf16 || !kSave, "only bf16 GEMM inputs are saved");
  if constexpr (kSave) {
    return ToBf16Parallel(x, static_cast<uint16_t *>(saved), n);
  } else {
    return g.Of(x, n);
  }
}

// ------------------------------------------------------------------ packed weights (evaluation)
// While the weights are frozen (RfSetWeightCache(1) .. RfSetWeightCache(0); util_mindspore's
// cpu_kernels.frozen_weights(), which engine evaluate() holds), the bf16 Linear forward keeps each
// weight rounded to bf16 and packed once into the blocked layout of oneDNN's matmul primitive,
// which then also adds the bias. dnnl_gemm_bf16bf16f32 instead rounds W, writes the bias rows and
// packs W again on every call, in every thread. Measured on the four ViT-L/16 Linear shapes at
// batch 8 (x24 blocks, 2 cores): GEMM + bias 2.31 s -> 2.18 s, and the 60 ms of weight rounding per
// forward is gone; the packed copies cost 2 bytes per weight while the block lasts.
// Each use checks a fingerprint of the weight (shape and 64 sampled values): a weight replaced or
// changed in a sampled value is packed again (a change that leaves all 64 equal is not seen: the
// frozen block promises that weights do not change). The values are those of the GEMM path (bf16 inputs rounded to nearest even, fp32
// accumulation, fp32 bias and output); only the summation order inside the GEMM differs.
// The subset of oneDNN's v3 C API used, resolved at run time like the GEMMs; the constants are the
// values of dnnl_types.h (plain layouts are given by strides, so no layout tag but "any" is used).
namespace dnnl_c {
using Handle = void *;
struct ExecArg {
  int arg;
  Handle memory;
};
constexpr int kCpu = 1, kDefaultFlags = 1, kBf16 = 2, kF32 = 3, kTagAny = 1, kScratchpadUser = 1;
constexpr int kQueryWeightsMd = 131, kQueryScratchpadMd = 136;
constexpr int kArgSrc = 1, kArgWeights = 33, kArgBias = 41, kArgDst = 17, kArgFrom = 1, kArgTo = 17,
              kArgScratchpad = 80;
}  // namespace dnnl_c

struct DnnlMatmul {
  using H = dnnl_c::Handle;
  int (*engine_create)(H *, int, size_t) = nullptr;
  int (*stream_create)(H *, H, unsigned) = nullptr;
  int (*md_create_with_strides)(H *, int, const int64_t *, int, const int64_t *) = nullptr;
  int (*md_create_with_tag)(H *, int, const int64_t *, int, int) = nullptr;
  int (*md_clone)(H *, H) = nullptr;
  int (*md_destroy)(H) = nullptr;
  int (*md_equal)(H, H) = nullptr;
  size_t (*md_get_size)(H) = nullptr;
  int (*memory_create)(H *, H, H, void *) = nullptr;
  int (*memory_destroy)(H) = nullptr;
  int (*matmul_pd_create)(H *, H, H, H, H, H, H) = nullptr;
  int (*reorder_pd_create)(H *, H, H, H, H, H) = nullptr;
  H (*pd_query_md)(H, int, int) = nullptr;
  int (*pd_destroy)(H) = nullptr;
  int (*primitive_create)(H *, H) = nullptr;
  int (*primitive_execute)(H, H, int, const dnnl_c::ExecArg *) = nullptr;
  int (*primitive_destroy)(H) = nullptr;
  int (*stream_wait)(H) = nullptr;
  int (*attr_create)(H *) = nullptr;
  int (*attr_destroy)(H) = nullptr;
  int (*attr_set_scratchpad_mode)(H, int) = nullptr;
  H engine = nullptr;
  bool ok = false;
};

const DnnlMatmul &GetMatmul() {
  static const DnnlMatmul api = [] {
    DnnlMatmul a;
    void *h = DnnlLibrary();
    if (h == nullptr) return a;
    bool all = true;
    auto bind = [&](auto &fn, const char *name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
      all = all && fn != nullptr;
    };
    bind(a.engine_create, "dnnl_engine_create");
    bind(a.stream_create, "dnnl_stream_create");
    bind(a.md_create_with_strides, "dnnl_memory_desc_create_with_strides");
    bind(a.md_create_with_tag, "dnnl_memory_desc_create_with_tag");
    bind(a.md_clone, "dnnl_memory_desc_clone");
    bind(a.md_destroy, "dnnl_memory_desc_destroy");
    bind(a.md_equal, "dnnl_memory_desc_equal");
    bind(a.md_get_size, "dnnl_memory_desc_get_size");
    bind(a.memory_create, "dnnl_memory_create");
    bind(a.memory_destroy, "dnnl_memory_destroy");
    bind(a.matmul_pd_create, "dnnl_matmul_primitive_desc_create");
    bind(a.reorder_pd_create, "dnnl_reorder_primitive_desc_create");
    bind(a.pd_query_md, "dnnl_primitive_desc_query_md");
    bind(a.pd_destroy, "dnnl_primitive_desc_destroy");
    bind(a.primitive_create, "dnnl_primitive_create");
    bind(a.primitive_execute, "dnnl_primitive_execute");
    bind(a.primitive_destroy, "dnnl_primitive_destroy");
    bind(a.stream_wait, "dnnl_stream_wait");
    bind(a.attr_create, "dnnl_primitive_attr_create");
    bind(a.attr_destroy, "dnnl_primitive_attr_destroy");
    bind(a.attr_set_scratchpad_mode, "dnnl_primitive_attr_set_scratchpad_mode");
    a.ok = all && a.engine_create(&a.engine, dnnl_c::kCpu, 0) == 0;
    return a;
  }();
  return api;
}

// A memory descriptor owned by this object.
class Md {
 public:
  Md() = default;
  explicit Md(dnnl_c::Handle h) : h_(h) {}
  ~Md() {
    if (h_ != nullptr) GetMatmul().md_destroy(h_);
  }
  Md(const Md &) = delete;
  Md &operator=(const Md &) = delete;
  // A (rows, cols) matrix of dtype with the given element strides ((cols, 1) row-major; (1, rows)
  // for the transposed view of a row-major (cols, rows) matrix).
  static std::unique_ptr<Md> Plain(int64_t rows, int64_t cols, int dtype, int64_t row_stride, int64_t col_stride) {
    const int64_t dims[2] = {rows, cols}, strides[2] = {row_stride, col_stride};
    dnnl_c::Handle h = nullptr;
    if (GetMatmul().md_create_with_strides(&h, 2, dims, dtype, strides) != 0) return nullptr;
    return std::make_unique<Md>(h);
  }
  dnnl_c::Handle get() const { return h_; }

 private:
  dnnl_c::Handle h_ = nullptr;
};

// A primitive with its scratchpad given by the caller on each execution. With the library's own
// scratchpad, concurrent executions (our threads, MindSpore's) would share one buffer: this
// threadpool build of oneDNN gave wrong results that way.
struct Prim {
  dnnl_c::Handle prim = nullptr;
  std::unique_ptr<Md> scratch;
  size_t scratch_bytes = 0;
  ~Prim() {
    if (prim != nullptr) GetMatmul().primitive_destroy(prim);
  }
  // Made from the primitive descriptor `create` makes with a user-scratchpad attribute, which
  // `inspect` may query before it is destroyed; false on failure.
  template <typename Create, typename Inspect>
  bool Make(Create create, Inspect inspect) {
    const DnnlMatmul &api = GetMatmul();
    dnnl_c::Handle attr = nullptr, pd = nullptr, smd = nullptr;
    if (api.attr_create(&attr) != 0) return false;
    bool ok = api.attr_set_scratchpad_mode(attr, dnnl_c::kScratchpadUser) == 0 && create(&pd, attr) == 0;
    api.attr_destroy(attr);
    if (!ok) return false;
    ok = api.md_clone(&smd, api.pd_query_md(pd, dnnl_c::kQueryScratchpadMd, 0)) == 0;
    if (ok) {
      scratch = std::make_unique<Md>(smd);
      scratch_bytes = api.md_get_size(smd);
      ok = api.primitive_create(&prim, pd) == 0;
    }
    if (ok) ok = inspect(pd);
    api.pd_destroy(pd);
    return ok;
  }
  // Executes with args + this thread's scratchpad, then waits.
  int Execute(std::vector<dnnl_c::ExecArg> args) const;
};

// The calling thread's oneDNN stream (MindSpore's libdnnl is a threadpool build: a stream made
// without a threadpool runs each primitive sequentially on the calling thread, like the GEMMs).
dnnl_c::Handle ThreadStream() {
  thread_local dnnl_c::Handle stream = [] {
    dnnl_c::Handle s = nullptr;
    if (GetMatmul().stream_create(&s, GetMatmul().engine, dnnl_c::kDefaultFlags) != 0) s = nullptr;
    return s;
  }();
  return stream;
}

// The calling thread's scratchpad, at least `bytes` long (64-byte aligned; grows, never shrinks).
void *ThreadScratch(size_t bytes) {
  thread_local std::unique_ptr<uint8_t, void (*)(void *)> buf{nullptr, std::free};
  thread_local size_t size = 0;
  if (bytes > size) {
    buf.reset();
    size = (bytes + 4095) / 4096 * 4096;
    buf.reset(static_cast<uint8_t *>(std::aligned_alloc(64, size)));
    if (buf == nullptr) size = 0;
  }
  return buf.get();
}

int Prim::Execute(std::vector<dnnl_c::ExecArg> args) const {
  const DnnlMatmul &api = GetMatmul();
  dnnl_c::Handle stream = ThreadStream(), smem = nullptr;
  if (stream == nullptr) return 1;
  if (scratch_bytes > 0) {
    void *buf = ThreadScratch(scratch_bytes);
    if (buf == nullptr || api.memory_create(&smem, scratch->get(), api.engine, buf) != 0) return 1;
    args.push_back({dnnl_c::kArgScratchpad, smem});
  }
  int s = api.primitive_execute(prim, stream, static_cast<int>(args.size()), args.data());
  if (s == 0) s = api.stream_wait(stream);
  if (smem != nullptr) api.memory_destroy(smem);
  return s;
}

// One matmul primitive per shape and source type: dst (rows, N) f32 = src (rows, K) x W (K, N) + bias
// f32. bf16 sources (the --cpu_bf16 cache): the weights in the layout the primitive chooses ("any");
// fp32 sources (weights packed in place): the weights in the given layout `fixed`, one per (K, N).
struct MatmulPrim {
  Prim p;
  std::unique_ptr<Md> src, wmd, bias, dst;  // wmd: the packed layout of the weights
};

const MatmulPrim *GetMatmulPrim(int64_t rows, int64_t k, int64_t n, int dtype = dnnl_c::kBf16,
                                const Md *fixed = nullptr) {
  static std::mutex mu;
  // never freed; a shape the primitive cannot be made for is kept as nullptr (not retried per call)
  static std::vector<std::pair<std::array<int64_t, 4>, std::unique_ptr<MatmulPrim>>> prims;
  // (`fixed` is not in the key: fp32 primitives always get InPlacePacks' one layout per (K, N).)
  const std::array<int64_t, 4> key = {rows, k, n, dtype};
  std::lock_guard<std::mutex> lock(mu);
  for (const auto &kv : prims) {
    if (kv.first == key) return kv.second.get();
  }
  prims.emplace_back(key, nullptr);  // replaced below when the primitive is made
  const DnnlMatmul &api = GetMatmul();
  auto p = std::make_unique<MatmulPrim>();
  p->src = Md::Plain(rows, k, dtype, k, 1);
  p->bias = Md::Plain(1, n, dnnl_c::kF32, n, 1);
  p->dst = Md::Plain(rows, n, dnnl_c::kF32, n, 1);
  const int64_t wdims[2] = {k, n};
  dnnl_c::Handle wany = nullptr;
  if (!p->src || !p->bias || !p->dst) return nullptr;
  if (fixed == nullptr && api.md_create_with_tag(&wany, 2, wdims, dtype, dnnl_c::kTagAny) != 0) return nullptr;
  Md wany_owned(wany);
  const bool made = p->p.Make(
      [&](dnnl_c::Handle *pd, dnnl_c::Handle attr) {
        return api.matmul_pd_create(pd, api.engine, p->src->get(), fixed != nullptr ? fixed->get() : wany,
                                    p->bias->get(), p->dst->get(), attr);
      },
      [&](dnnl_c::Handle pd) {  // the packed weights layout the primitive chose (or was given)
        dnnl_c::Handle packed = nullptr;
        if (api.md_clone(&packed, api.pd_query_md(pd, dnnl_c::kQueryWeightsMd, 0)) != 0) return false;
        p->wmd = std::make_unique<Md>(packed);
        return fixed == nullptr || api.md_equal(packed, fixed->get()) != 0;
      });
  if (!made) return nullptr;
  prims.back().second = std::move(p);
  return prims.back().second.get();
}

// dst = src x W + bias through `prim` on the calling thread, W given in layout `wmd`: 0, or 20 + oneDNN's status.
int RunMatmul(const MatmulPrim &prim, const void *src, const Md &wmd, const void *w, const float *b, float *dst) {
  const DnnlMatmul &api = GetMatmul();
  dnnl_c::Handle mem[4] = {nullptr, nullptr, nullptr, nullptr};
  int s = api.memory_create(&mem[0], prim.src->get(), api.engine, const_cast<void *>(src));
  if (s == 0) s = api.memory_create(&mem[1], wmd.get(), api.engine, const_cast<void *>(w));
  if (s == 0) s = api.memory_create(&mem[2], prim.bias->get(), api.engine, const_cast<float *>(b));
  if (s == 0) s = api.memory_create(&mem[3], prim.dst->get(), api.engine, dst);
  if (s == 0)
    s = prim.p.Execute({{dnnl_c::kArgSrc, mem[0]}, {dnnl_c::kArgWeights, mem[1]}, {dnnl_c::kArgBias, mem[2]},
                        {dnnl_c::kArgDst, mem[3]}});
  for (dnnl_c::Handle h : mem) {
    if (h != nullptr) api.memory_destroy(h);
  }
  return s == 0 ? 0 : 20 + s;
}

// Copies `from` (layout from_md) into `to` (layout to_md, same logical matrix) on the calling thread.
int Reorder(const Md &from_md, const void *from, const Md &to_md, void *to) {
  const DnnlMatmul &api = GetMatmul();
  Prim reorder;
  if (!reorder.Make(
          [&](dnnl_c::Handle *pd, dnnl_c::Handle attr) {
            return api.reorder_pd_create(pd, from_md.get(), api.engine, to_md.get(), api.engine, attr);
          },
          [](dnnl_c::Handle) { return true; }))
    return 1;
  dnnl_c::Handle src = nullptr, dst = nullptr;
  int s = api.memory_create(&src, from_md.get(), api.engine, const_cast<void *>(from));
  if (s == 0) s = api.memory_create(&dst, to_md.get(), api.engine, to);
  if (s == 0) s = reorder.Execute({{dnnl_c::kArgFrom, src}, {dnnl_c::kArgTo, dst}});
  if (src != nullptr) api.memory_destroy(src);
  if (dst != nullptr) api.memory_destroy(dst);
  return s == 0 ? 0 : 1;
}

// W (N, K) fp32 rounded to bf16 and packed into a primitive's layout.
struct PackedWeight {
  uint64_t fingerprint = 0;
  int64_t n = 0, k = 0;
  std::unique_ptr<Md> md;
  std::unique_ptr<uint8_t, void (*)(void *)> data{nullptr, std::free};
};

uint64_t Fingerprint(const float *w, int64_t n, int64_t k) {
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(n) * 31 ^ static_cast<uint64_t>(k);
  const int64_t total = n * k;
  for (int i = 0; i < 64 && total > 0; ++i) {
    const int64_t idx = (total - 1) * i / 63;
    h = (h ^ __builtin_bit_cast(uint32_t, w[idx])) * 1099511628211ull;
  }
  return h;
}

class WeightCache {
 public:
  static WeightCache &Get() {
    static WeightCache *cache = new WeightCache();
    return *cache;
  }
  bool active() const { return active_.load(std::memory_order_acquire); }
  int SetActive(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    const int was = active_.load() ? 1 : 0;
    active_.store(on, std::memory_order_release);
    if (!on) entries_.clear();  // in-flight users hold their own shared_ptr
    return was;
  }
  // The packed copy of w (fingerprint fp) in layout `md` (packing it when missing, stale or in
  // another layout).
  std::shared_ptr<const PackedWeight> Find(const float *w, uint64_t fp, int64_t n, int64_t k, const Md &md) {
    if (auto hit = Lookup(w, fp, n, k, md)) return hit;
    std::lock_guard<std::mutex> packing(pack_mu_);  // one thread packs, the others then find it
    if (auto hit = Lookup(w, fp, n, k, md)) return hit;
    std::shared_ptr<PackedWeight> packed = Pack(w, n, k, md);
    if (!packed) return nullptr;
    packed->fingerprint = fp;
    std::lock_guard<std::mutex> lock(mu_);
    ++packs_;
    if (!active_.load()) return packed;  // switched off meanwhile: use it once, keep nothing
    // Replaced: this weight's copy in the same layout (stale). Kept: its copies in other layouts
    // (row blocks of other sizes may choose another). Dropped: entries unused for two rounds of
    // every entry held (a weight computed inside the graph, the patch embedding's reshaped kernel,
    // comes at a new address on some forwards).
    const uint64_t horizon = 2 * entries_.size() + 8;
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [&](const Entry &e) {
                                    return (e.w == w && GetMatmul().md_equal(e.packed->md->get(), md.get())) ||
                                           tick_ - e.last > horizon;
                                  }),
                   entries_.end());
    entries_.push_back({w, tick_, packed});
    return packed;
  }
  int64_t Stat(int what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (what == 0) return static_cast<int64_t>(entries_.size());
    if (what == 1) {
      int64_t bytes = 0;
      for (const auto &e : entries_) bytes += static_cast<int64_t>(GetMatmul().md_get_size(e.packed->md->get()));
      return bytes;
    }
    return what == 2 ? packs_ : what == 3 ? calls_ : -1;
  }
  void CountCall() {
    std::lock_guard<std::mutex> lock(mu_);
    ++calls_;
    ++tick_;
  }

 private:
  std::shared_ptr<PackedWeight> Pack(const float *w, int64_t n, int64_t k, const Md &md) {
    const DnnlMatmul &api = GetMatmul();
    auto p = std::make_shared<PackedWeight>();
    p->n = n;
    p->k = k;
    dnnl_c::Handle clone = nullptr;
    if (api.md_clone(&clone, md.get()) != 0) return nullptr;
    p->md = std::make_unique<Md>(clone);
    const size_t bytes = api.md_get_size(md.get());
    p->data.reset(static_cast<uint8_t *>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
    if (p->data == nullptr) return nullptr;
    Bf16Lease lease;
    const uint16_t *wb = lease.Convert(w, n * k);
    auto plain = Md::Plain(k, n, dnnl_c::kBf16, 1, k);  // W^T (K, N) viewed in W's (N, K) row-major memory
    if (!plain) return nullptr;
    const int s = Reorder(*plain, wb, md, p->data.get());
    if (s != 0) return nullptr;
    return p;
  }

  struct Entry {
    const float *w;
    uint64_t last;  // tick_ of its last use
    std::shared_ptr<PackedWeight> packed;
  };
  std::shared_ptr<const PackedWeight> Lookup(const float *w, uint64_t fp, int64_t n, int64_t k, const Md &md) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto &e : entries_) {
      const PackedWeight &p = *e.packed;
      if (e.w == w && p.fingerprint == fp && p.n == n && p.k == k && GetMatmul().md_equal(p.md->get(), md.get())) {
        e.last = tick_;
        return e.packed;
      }
    }
    return nullptr;
  }

  std::mutex mu_, pack_mu_;
  std::atomic<bool> active_{false};
  std::vector<Entry> entries_;
  int64_t packs_ = 0, calls_ = 0;
  uint64_t tick_ = 0;
};

// y (M, N) = xb (M, K) bf16 x packed bf16 W^T + b, split over the threads by rows. Non-zero when the
// packed path is unavailable (the caller then takes the GEMM path; y is only written, never read).
int LinearPacked(const uint16_t *xb, const float *w, const float *b, float *y, int64_t m, int64_t n, int64_t k) {
  const DnnlMatmul &api = GetMatmul();
  if (!api.ok) return 1;
  WeightCache::Get().CountCall();
  const uint64_t fp = Fingerprint(w, n, k);
  return ParallelStatus(m, 64, [&](int64_t lo, int64_t hi) {
    const MatmulPrim *prim = GetMatmulPrim(hi - lo, k, n);
    if (prim == nullptr) return 1;
    const std::shared_ptr<const PackedWeight> pw = WeightCache::Get().Find(w, fp, n, k, *prim->wmd);
    if (!pw) return 1;
    return RunMatmul(*prim, xb + lo * k, *pw->md, pw->data.get(), b, y + lo * n);
  });
}

// ------------------------------------------------------------------ fp32 weights packed in place (evaluation)
// dnnl_sgemm packs W again on every call, in every thread; oneDNN's matmul primitive with W already
// in its blocked layout ran the four ViT-L/16 Linear shapes at batch 8 (x24 blocks) in 4.37 s
// against 4.64 s (6% less; the primitive with W in its plain layout: 4.65 s). A packed copy would
// add 4 bytes per weight (1.2 GB for ViT-L/16, ~1.5x the original's evaluation peak RSS), so while
// an fp32 model evaluates, util_mindspore's cpu_kernels.frozen_weights(model) reorders each Linear
// weight *in its own storage* into that layout (same size: only shapes whose packed layout has no
// padding) and back when the block exits. In between, the fp32 Linear forward finds its weight
// here by address and runs the primitive; every other reader of a packed weight (the backward, the
// bf16 forward) refuses it with an error instead of reading it as plain. The reorders are copies:
// unpacking restores every bit; the outputs differ from dnnl_sgemm's only in summation order.
// fn(i) for i in [0, count), at most kReorderLanes at once (each reorder holds a full-size copy of
// its weight: on a many-core machine one per thread would add up to a copy of the model).
constexpr int64_t kReorderLanes = 4;
template <typename F>
void ForEachInLanes(int64_t count, F fn) {
  const int64_t lanes = std::min(count, kReorderLanes);
  ParallelFor(lanes, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t lane = lo; lane < hi; ++lane) {
      for (int64_t i = lane; i < count; i += lanes) fn(i);
    }
  });
}

// Tests: make LinearInPlace take its fallback path (reorder W to plain, dnnl_sgemm) on every call.
std::atomic<bool> g_in_place_force_fallback{false};

// The message a refused read of a packed weight prints before its operator fails (MindSpore itself
// only reports the kernel's return value).
int RefusePacked(const char *what) {
  std::fprintf(stderr,
               "retfound_cpu_kernels: %s refused: this Linear weight is packed in place for evaluation "
               "(inside util_mindspore.cpu_kernels.frozen_weights(model)); only the model's fp32 forward may "
               "read it there: leave the block first\n",
               what);
  return 5;
}

// Reorders w (bytes long) in its own storage from layout `from` to layout `to`, through a scratch
// copy; on failure w is left as it was. 0 on success.
int ReorderInPlace(float *w, size_t bytes, const Md &from, const Md &to) {
  std::unique_ptr<float, void (*)(void *)> copy{static_cast<float *>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)),
                                                std::free};
  if (copy == nullptr) return 1;
  std::memcpy(copy.get(), w, bytes);
  if (Reorder(from, copy.get(), to, w) == 0) return 0;
  std::memcpy(w, copy.get(), bytes);  // as it was
  return 1;
}

class InPlacePacks {
 public:
  static InPlacePacks &Get() {
    static InPlacePacks *packs = new InPlacePacks();
    return *packs;
  }

  // The layout W (K, N) fp32 is packed into for this shape, chosen once by the primitive for a
  // block of `kRowsHint` rows (the chosen layout did not depend on the rows for ViT shapes, and a
  // primitive for other row counts is made with it); nullptr when it pads or is W's own layout.
  const Md *LayoutFor(int64_t k, int64_t n) {
    std::lock_guard<std::mutex> lock(layout_mu_);
    for (const auto &l : layouts_) {
      if (l.k == k && l.n == n) return l.md.get();
    }
    layouts_.push_back({k, n, nullptr});
    const MatmulPrim *prim = GetMatmulPrim(kRowsHint, k, n, dnnl_c::kF32, nullptr);
    const DnnlMatmul &api = GetMatmul();
    auto plain = Md::Plain(k, n, dnnl_c::kF32, 1, k);
    if (prim == nullptr || !plain || api.md_get_size(prim->wmd->get()) != static_cast<size_t>(n * k) * sizeof(float) ||
        api.md_equal(prim->wmd->get(), plain->get()) != 0)
      return nullptr;
    dnnl_c::Handle clone = nullptr;
    if (api.md_clone(&clone, prim->wmd->get()) != 0) return nullptr;
    layouts_.back().md = std::make_unique<Md>(clone);
    return layouts_.back().md.get();
  }

  // Packs w (N, K) in place: 0 packed, 1 already packed, 2 no layout of the same size for this
  // shape (w left plain), 3 failed (w left plain and unchanged).
  int Pack(float *w, int64_t n, int64_t k) {
    if (w == nullptr || n <= 0 || k <= 0) return 3;
    if (Find(w, n, k) != nullptr) return 1;
    const Md *layout = LayoutFor(k, n);
    if (layout == nullptr) return 2;
    auto plain = Md::Plain(k, n, dnnl_c::kF32, 1, k);
    if (!plain || ReorderInPlace(w, static_cast<size_t>(n * k) * sizeof(float), *plain, *layout) != 0) return 3;
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_back({w, n, k, layout, 0});
    count_.store(static_cast<int64_t>(entries_.size()), std::memory_order_release);
    return 0;
  }

  // Restores every packed weight to its plain layout (ForEachInLanes); returns how many could not
  // be restored (they stay registered, so readers still refuse them).
  int64_t UnpackAll() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<char> failed(entries_.size(), 0);
    ForEachInLanes(static_cast<int64_t>(entries_.size()), [&](int64_t i) {
      const Entry &e = entries_[i];
      auto plain = Md::Plain(e.k, e.n, dnnl_c::kF32, 1, e.k);
      // on failure: still packed, still registered
      failed[i] = !plain || ReorderInPlace(e.w, static_cast<size_t>(e.n * e.k) * sizeof(float), *e.layout, *plain) != 0;
    });
    std::vector<Entry> kept;
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (failed[i]) kept.push_back(entries_[i]);
    }
    entries_.swap(kept);
    count_.store(static_cast<int64_t>(entries_.size()), std::memory_order_release);
    return static_cast<int64_t>(entries_.size());
  }

  // The layout of w when it is packed in place (nullptr: plain). Lock-free while nothing is packed.
  // read: the caller is the fp32 forward, which will read it through the packed path (counted).
  const Md *Find(const float *w, int64_t n, int64_t k, bool read = false) {
    if (count_.load(std::memory_order_acquire) == 0) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto &e : entries_) {
      if (e.w != w) continue;
      if (e.n != n || e.k != k) return &mismatch_;
      if (read) ++e.reads;
      return e.layout;
    }
    return nullptr;
  }
  // How many weights packed now were never read through the packed path since they were packed.
  int64_t Unread() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::count_if(entries_.begin(), entries_.end(), [](const Entry &e) { return e.reads == 0; });
  }
  // Find()'s answer for a packed weight seen with another shape (its readers refuse it).
  bool IsMismatch(const Md *md) const { return md == &mismatch_; }

  int64_t Count() const { return count_.load(std::memory_order_acquire); }
  int64_t Calls() const { return calls_.load(std::memory_order_relaxed); }
  void CountCall() { calls_.fetch_add(1, std::memory_order_relaxed); }

 private:
  static constexpr int64_t kRowsHint = 512;
  struct Layout {
    int64_t k, n;
    std::unique_ptr<Md> md;  // nullptr: not packable in place
  };
  struct Entry {
    float *w;
    int64_t n, k;
    const Md *layout;    // owned by layouts_ (never freed)
    int64_t reads = 0;   // fp32 forwards that read it through the packed path
  };
  std::mutex mu_, layout_mu_;
  std::vector<Layout> layouts_;
  std::vector<Entry> entries_;
  std::atomic<int64_t> count_{0}, calls_{0};
  Md mismatch_;
};

// y (M, N) = x (M, K) fp32 x W^T + b with W packed in place in `layout`, split over the threads by
// rows. A row count whose primitive cannot take that layout reorders W into a plain scratch copy
// for that call and runs dnnl_sgemm (not seen for ViT shapes).
int LinearInPlace(const float *x, const Md &layout, const float *w, const float *b, float *y, int64_t m, int64_t n,
                  int64_t k) {
  InPlacePacks::Get().CountCall();
  std::once_flag plain_once;  // the fallback's plain copy of W: made once per call, shared by the row blocks
  std::vector<float> plain_w;
  bool plain_ok = false;
  return ParallelStatus(m, 64, [&](int64_t lo, int64_t hi) {
    const MatmulPrim *prim =
        g_in_place_force_fallback.load(std::memory_order_relaxed) ? nullptr : GetMatmulPrim(hi - lo, k, n, dnnl_c::kF32, &layout);
    if (prim == nullptr) {
      std::call_once(plain_once, [&] {
        auto plain = Md::Plain(k, n, dnnl_c::kF32, 1, k);
        plain_w.resize(static_cast<size_t>(n * k));
        plain_ok = plain && Reorder(layout, w, *plain, plain_w.data()) == 0;
      });
      if (!plain_ok || GetDnnl().sgemm == nullptr) return 31;
      for (int64_t i = lo; i < hi; ++i) std::memcpy(y + i * n, b, sizeof(float) * n);
      const int s = GetDnnl().sgemm('N', 'T', hi - lo, n, k, 1.0f, x + lo * k, k, plain_w.data(), k, 1.0f,
                                    y + lo * n, n);
      return s == 0 ? 0 : 10 + s;
    }
    return RunMatmul(*prim, x + lo * k, layout, w, b, y + lo * n);
  });
}

// C (m x n, row-major, ldc) = op(A) op(B) [+ C when accumulate], split over threads by rows of C
// (each thread one sequential oneDNN call on its row block). op(A) rows start at A + r * a_row_step.
template <typename T, typename Fn>
int Gemm(Fn fn, char ta, char tb, int64_t m, int64_t n, int64_t k, const T *a, int64_t lda, int64_t a_row_step,
         const T *b, int64_t ldb, bool accumulate, float *c, int64_t ldc) {
  if (fn == nullptr) return 3;
  return ParallelStatus(m, 64, [&](int64_t lo, int64_t hi) {
    const int s = fn(ta, tb, hi - lo, n, k, 1.0f, a + lo * a_row_step, lda, b, ldb, accumulate ? 1.0f : 0.0f,
                     c + lo * ldc, ldc);
    return s == 0 ? 0 : 10 + s;
  });
}

// LinearFwd(x (.., K), w (N, K), b (N)) -> y (.., N) = x @ w^T + b, GEMM inputs of precision kBf16.
// kSave (bf16 only): -> (y, xb): xb (.., K) is x rounded to bf16, the GEMM's input, given out so
// that the backward keeps it instead of x (half the memory; the same values it would round).
template <bool kBf16, bool kSave = kBf16>
int LinearFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != (kSave ? 5 : 4) || !DtypesAre(nparam, dtypes, kSave ? "ffffb" : "ffff")) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t n = shapes[1][0], k = shapes[1][1];
  if (ndims[1] != 2 || k <= 0 || LastDim(ndims[0], shapes[0]) != k || Numel(ndims[2], shapes[2]) != n) return 2;
  const int64_t m = RowsOf(Numel(ndims[0], shapes[0]), k);
  if (kSave && Numel(ndims[4], shapes[4]) != m * k) return 2;
  if (const Md *layout = InPlacePacks::Get().Find(w, n, k, !kBf16)) {  // packed in place (fp32 evaluation)
    if (kBf16) return RefusePacked("the bf16 Linear forward");
    if (InPlacePacks::Get().IsMismatch(layout)) return RefusePacked("a Linear forward with another weight shape");
    return LinearInPlace(x, *layout, w, b, y, m, n, k);
  }
  GemmInput<kBf16> xg, wg;
  const auto *xi = SavingTo<kBf16, kSave>(xg, x, kSave ? params[4] : nullptr, m * k);
  if constexpr (kBf16) {  // weights frozen (evaluation): packed once, bias added by the primitive
    if (WeightCache::Get().active() && LinearPacked(xi, w, b, y, m, n, k) == 0) return 0;
  }
  ParallelFor(m, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(y + i * n, b, sizeof(float) * n);
  });
  return Gemm(Precision<kBf16>::Gemm(), 'N', 'T', m, n, k, xi, k, k, wg.Of(w, n * k), k, true, y, n);
}

// LinearBwd(x (M, K), w (N, K), dy (M, N)) -> dx = dy @ w, dw = dy^T @ x, db = column sums of dy;
// kBf16: GEMM inputs rounded to bf16 here; kSaved: x is the forward's xb (bf16 already).
template <bool kBf16, bool kSaved = kBf16>
int LinearBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 6 || !DtypesAre(nparam, dtypes, kSaved ? "bfffff" : "ffffff")) return 1;
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  float *db = static_cast<float *>(params[5]);
  const int64_t n = shapes[1][0], k = shapes[1][1];
  if (ndims[1] != 2 || LastDim(ndims[0], shapes[0]) != k || LastDim(ndims[2], shapes[2]) != n) return 2;
  const int64_t m = RowsOf(Numel(ndims[0], shapes[0]), k);
  if (k <= 0 || Numel(ndims[2], shapes[2]) != m * n) return 2;
  if (InPlacePacks::Get().Find(w, n, k) != nullptr) return RefusePacked("the Linear backward");  // frozen
  ColSum(dy, m, n, db);
  GemmInput<kBf16> xg, wg, gg;
  const auto *xi = SavedOr<kBf16, kSaved>(xg, params[0], m * k);
  const auto *wi = wg.Of(w, n * k), *gi = gg.Of(dy, m * n);
  const auto gemm = Precision<kBf16>::Gemm();
  int s = Gemm(gemm, 'N', 'N', m, k, n, gi, n, n, wi, k, false, dx, k);
  if (s == 0) s = Gemm(gemm, 'T', 'N', n, k, m, gi, n, 1, xi, k, false, dw, k);
  return s;
}

// y = f(x + b), x (.., N), b (N), row by row
template <typename F>
int BiasMap(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, F f) {
  if (nparam != 3 || !AllF32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t cols = LastDim(ndims[0], shapes[0]);
  if (cols < 0 || Numel(ndims[1], shapes[1]) != cols) return 2;
  const int64_t rows = RowsOf(Numel(ndims[0], shapes[0]), cols);
  ParallelFor(rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float *xi = x + i * cols;
      float *yi = y + i * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) yi[j] = f(xi[j] + b[j]);
    }
  });
  return 0;
}

// out = (x +) y * s[b] over samples b of y (B, ..): x == nullptr for the plain scaling.
void RowScaleInto(const float *x, const float *y, const float *sc, float *out, int64_t bsz, int64_t per) {
  ParallelFor(bsz * per, 16384, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi;) {
      const int64_t b = i / per, end = std::min(hi, (b + 1) * per);
      const float f = sc[b];
      if (x == nullptr) {
#pragma omp simd
        for (int64_t j = i; j < end; ++j) out[j] = y[j] * f;
      } else {
#pragma omp simd
        for (int64_t j = i; j < end; ++j) out[j] = x[j] + y[j] * f;
      }
      i = end;
    }
  });
}

}  // namespace

extern "C" {

// ---------------------------------------------------------------- GELU (exact, erf form)
// GeluFwd(x) -> y
int RfGeluFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2 || !AllF32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = Numel(ndims[0], shapes[0]);
  ParallelFor(n, 16384, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) y[i] = GeluF(x[i]);
  });
  return 0;
}

// GeluBwd(x, dy) -> dx
int RfGeluBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || !AllF32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = Numel(ndims[0], shapes[0]);
  ParallelFor(n, 16384, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) dx[i] = dy[i] * GeluGradF(x[i]);
  });
  return 0;
}

// ---------------------------------------------------------------- bias add (+ GELU)
// BiasAdd(x (.., N), b (N)) -> y
int RfBiasAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return BiasMap(nparam, params, ndims, shapes, dtypes, [](float v) { return v; });
}

// BiasGrad(dy (.., N)) -> db (N): the bias gradient, sum over every leading axis
int RfBiasGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2 || !AllF32(nparam, dtypes)) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  float *db = static_cast<float *>(params[1]);
  const int64_t cols = LastDim(ndims[0], shapes[0]);
  if (cols < 0 || Numel(ndims[1], shapes[1]) != cols) return 2;
  ColSum(dy, RowsOf(Numel(ndims[0], shapes[0]), cols), cols, db);
  return 0;
}

// BiasGeluFwd(x (.., N), b (N)) -> y = gelu(x + b)
int RfBiasGeluFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return BiasMap(nparam, params, ndims, shapes, dtypes, [](float v) { return GeluF(v); });
}

// BiasGeluBwd(x, b, dy) -> (dx, db): dx = dy * gelu'(x + b), db = column sums of dx
int RfBiasGeluBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || !AllF32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *db = static_cast<float *>(params[4]);
  const int64_t cols = LastDim(ndims[0], shapes[0]);
  if (cols < 0 || Numel(ndims[1], shapes[1]) != cols || Numel(ndims[2], shapes[2]) != Numel(ndims[0], shapes[0]))
    return 2;
  const int64_t rows = RowsOf(Numel(ndims[0], shapes[0]), cols);
  ParallelFor(rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float *xi = x + i * cols;
      const float *gi = dy + i * cols;
      float *di = dx + i * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) di[j] = gi[j] * GeluGradF(xi[j] + b[j]);
    }
  });
  ColSum(dx, rows, cols, db);
  return 0;
}

// ---------------------------------------------------------------- LayerNorm (last axis)
// LayerNormFwd(x (.., D), gamma (D), beta (D), eps (1)) -> (y (.., D), mean (M), rstd (M))
int RfLayerNormFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 7 || !AllF32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *g = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  float *mean = static_cast<float *>(params[5]);
  float *rstd = static_cast<float *>(params[6]);
  const int64_t d = LastDim(ndims[0], shapes[0]);
  const int64_t rows = RowsOf(Numel(ndims[0], shapes[0]), d);
  if (d < 0 || Numel(ndims[1], shapes[1]) != d || Numel(ndims[2], shapes[2]) != d || Numel(ndims[3], shapes[3]) < 1 ||
      Numel(ndims[5], shapes[5]) != rows || Numel(ndims[6], shapes[6]) != rows)
    return 2;
  ParallelFor(rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float *xi = x + i * d;
      float *yi = y + i * d;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) s += xi[j];
      const float mu = s / static_cast<float>(d);
      float v = 0.0f;
#pragma omp simd reduction(+ : v)
      for (int64_t j = 0; j < d; ++j) v += (xi[j] - mu) * (xi[j] - mu);
      const float r = 1.0f / std::sqrt(v / static_cast<float>(d) + eps);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yi[j] = (xi[j] - mu) * r * g[j] + b[j];
      mean[i] = mu;
      rstd[i] = r;
    }
  });
  return 0;
}

// LayerNormBwd(x, gamma, mean, rstd, dy) -> (dx, dgamma, dbeta)
int RfLayerNormBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 8 || !AllF32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *g = static_cast<const float *>(params[1]);
  const float *mean = static_cast<const float *>(params[2]);
  const float *rstd = static_cast<const float *>(params[3]);
  const float *dy = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dg = static_cast<float *>(params[6]);
  float *db = static_cast<float *>(params[7]);
  const int64_t d = LastDim(ndims[0], shapes[0]);
  const int64_t rows = RowsOf(Numel(ndims[0], shapes[0]), d);
  if (d < 0 || Numel(ndims[1], shapes[1]) != d || Numel(ndims[2], shapes[2]) != rows ||
      Numel(ndims[3], shapes[3]) != rows || Numel(ndims[4], shapes[4]) != Numel(ndims[0], shapes[0]))
    return 2;
  const float inv_d = 1.0f / static_cast<float>(d);
  ParallelFor(rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float *xi = x + i * d;
      const float *gi = dy + i * d;
      float *di = dx + i * d;
      const float mu = mean[i], r = rstd[i];
      float a = 0.0f, c = 0.0f;  // sum(dy*g), sum(dy*g*xhat)
#pragma omp simd reduction(+ : a, c)
      for (int64_t j = 0; j < d; ++j) {
        const float gh = gi[j] * g[j];
        a += gh;
        c += gh * (xi[j] - mu) * r;
      }
      a *= inv_d;
      c *= inv_d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) di[j] = r * (gi[j] * g[j] - a - (xi[j] - mu) * r * c);
    }
  });
  // dgamma = sum_i dy * xhat, dbeta = sum_i dy: column slabs, thread-count independent
  ParallelFor((d + 63) / 64, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j0 = lo * 64; j0 < std::min(d, hi * 64); j0 += 64) {
      const int64_t j1 = std::min(d, j0 + 64);
      float ag[64] = {0}, ab[64] = {0};
      for (int64_t i = 0; i < rows; ++i) {
        const float *xi = x + i * d;
        const float *gi = dy + i * d;
        const float mu = mean[i], r = rstd[i];
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          ag[j - j0] += gi[j] * (xi[j] - mu) * r;
          ab[j - j0] += gi[j];
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        dg[j] = ag[j - j0];
        db[j] = ab[j - j0];
      }
    }
  });
  return 0;
}

// ---------------------------------------------------------------- softmax (last axis)
// SoftmaxFwd(x) -> y
int RfSoftmaxFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2 || !AllF32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t d = LastDim(ndims[0], shapes[0]);
  if (d < 0) return 2;
  const int64_t rows = RowsOf(Numel(ndims[0], shapes[0]), d);
  ParallelFor(rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) SoftmaxRow(x + i * d, y + i * d, d);
  });
  return 0;
}

// SoftmaxBwd(y, dy) -> dx = y * (dy - sum(dy * y))
int RfSoftmaxBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || !AllF32(nparam, dtypes)) return 1;
  const float *y = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t d = LastDim(ndims[0], shapes[0]);
  if (d < 0 || Numel(ndims[1], shapes[1]) != Numel(ndims[0], shapes[0])) return 2;
  const int64_t rows = RowsOf(Numel(ndims[0], shapes[0]), d);
  ParallelFor(rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) SoftmaxGradRow(y + i * d, dy + i * d, dx + i * d, d);
  });
  return 0;
}

// ---------------------------------------------------------------- stochastic depth
// RowScale(y (B, ..), s (B)) -> y * s[b] (drop path: s = mask / keep_prob; its own gradient too)
int RfRowScale(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || !AllF32(nparam, dtypes)) return 1;
  const int64_t bsz = ndims[0] > 0 ? shapes[0][0] : -1;
  if (bsz < 0 || Numel(ndims[1], shapes[1]) != bsz) return 2;
  RowScaleInto(nullptr, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
               static_cast<float *>(params[2]), bsz, RowsOf(Numel(ndims[0], shapes[0]), bsz));
  return 0;
}

// AddRowScale(x, y (B, ..), s (B)) -> x + y * s[b]: a residual connection through drop path
int RfAddRowScale(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 4 || !AllF32(nparam, dtypes)) return 1;
  const int64_t bsz = ndims[0] > 0 ? shapes[0][0] : -1;
  if (bsz < 0 || Numel(ndims[2], shapes[2]) != bsz || Numel(ndims[1], shapes[1]) != Numel(ndims[0], shapes[0])) return 2;
  RowScaleInto(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
               static_cast<const float *>(params[2]), static_cast<float *>(params[3]), bsz,
               RowsOf(Numel(ndims[0], shapes[0]), bsz));
  return 0;
}

// ---------------------------------------------------------------- AdamW
// AdamWStep(param, exp_avg, exp_avg_sq, grad, step_h (6,), group_h (2,)) -> done (1,):
// torch.optim.AdamW's step for one parameter, written IN PLACE into param, exp_avg and exp_avg_sq
// (util_mindspore/optim.py makes it wait for every gradient of the step). The scalars are
//   step_h = [lr, beta1, beta2, eps, 1 - beta1^t, sqrt(1 - beta2^t)],  group_h = [lr_scale, weight_decay]
// and every operation, scalar or per element, is the composed reference update's, in the same
// float32 order (torch's _single_tensor_adamw; this file is compiled without FP contraction):
//   p *= 1 - lr*wd;  m += (1 - b1) * (g - m);  v = v*b2 + ((1 - b2)*g)*g;
//   p -= (lr/bc1) * (m / (sqrt(v)/sqrt(bc2) + eps))
// One threaded pass over the four arrays; MindSpore's AdamWeightDecay kernel took 2-4x longer.
int RfAdamWStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 7 || !AllF32(nparam, dtypes)) return 1;
  const int64_t n = Numel(ndims[0], shapes[0]);
  for (int i = 1; i < 4; ++i) {
    if (Numel(ndims[i], shapes[i]) != n) return 2;
  }
  if (Numel(ndims[4], shapes[4]) != 6 || Numel(ndims[5], shapes[5]) != 2) return 2;
  float *param = static_cast<float *>(params[0]), *exp_avg = static_cast<float *>(params[1]),
        *exp_avg_sq = static_cast<float *>(params[2]);
  const float *grad = static_cast<const float *>(params[3]), *sh = static_cast<const float *>(params[4]),
              *gh = static_cast<const float *>(params[5]);
  const float lr = sh[0], b1 = sh[1], b2 = sh[2], eps = sh[3], bc1 = sh[4], bc2_sqrt = sh[5];
  const float group_lr = lr * gh[0];
  const float decay = 1.0f - group_lr * gh[1], one_minus_b1 = 1.0f - b1, one_minus_b2 = 1.0f - b2,
              step = group_lr / bc1;
  ParallelFor(n, 1 << 15, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const float g = grad[i];
      const float m = exp_avg[i] + one_minus_b1 * (g - exp_avg[i]);
      const float v = exp_avg_sq[i] * b2 + one_minus_b2 * g * g;
      const float denom = std::sqrt(v) / bc2_sqrt + eps;
      param[i] = param[i] * decay - step * (m / denom);
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
    }
  });
  static_cast<float *>(params[6])[0] = 1.0f;
  return 0;
}

}  // extern "C"

// ---------------------------------------------------------------- attention core
// The core's sizes from qkv's shape (B, N, 3C) and the head count; false when they do not fit.
struct AttnDims {
  int64_t bsz, n, c3, c, heads;
};
inline bool AttnDimsOf(const int64_t *qkv_shape, int64_t heads, AttnDims *d) {
  *d = {qkv_shape[0], qkv_shape[1], qkv_shape[2], qkv_shape[2] / 3, heads};
  return d->c3 == 3 * d->c && heads > 0 && d->c % heads == 0;
}

// Whether a parameter's shape is exactly `want`.
inline bool ShapeIs(int nd, const int64_t *shape, std::initializer_list<int64_t> want) {
  return nd == static_cast<int>(want.size()) && std::equal(want.begin(), want.end(), shape);
}

// Attention core for qkv (B, N, 3C) with `heads` heads -> out (B, N, C); p (B, H, N, N) receives
// the softmax probabilities, or is nullptr (inference: each task keeps its head's p in scratch).
// For each (batch, head), with q, k, v read in place from qkv (timm's reshape-permute layout),
//   p = softmax(scale * q k^T),  out[:, h*hd:(h+1)*hd] = p v   (heads merged as timm's transpose).
// One task per (batch, head) on the thread pool, each making sequential oneDNN calls.
// kBf16 (the --cpu_bf16 mode, as torch.autocast's bf16 scaled_dot_product_attention): q, k, v
// and p enter the two GEMMs rounded to bf16, accumulation, softmax, p and out stay fp32.
// qkv_in is qkv in the GEMMs' precision (fp32 itself, or rounded to bf16 by the caller).
template <bool kBf16>
int AttnCore(const typename Precision<kBf16>::In *qkv_in, float scale, float *out, float *p, int64_t bsz, int64_t n,
             int64_t c, int64_t heads) {
  const int64_t c3 = 3 * c, hd = c / heads;
  const auto gemm = Precision<kBf16>::Gemm();
  if (gemm == nullptr) return 3;
  return ParallelStatus(bsz * heads, 1, [&](int64_t lo, int64_t hi) {
    TaskGemmInput<kBf16> p_g;
    std::vector<float> scratch(p == nullptr ? static_cast<size_t>(n * n) : 0);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const auto *q = qkv_in + b * n * c3 + h * hd, *k = q + c, *v = q + 2 * c;
      float *pb = p ? p + bh * n * n : scratch.data();
      int st = gemm('N', 'T', n, n, hd, scale, q, c3, k, c3, 0.0f, pb, n);
      for (int64_t i = 0; i < n && st == 0; ++i) SoftmaxRow(pb + i * n, pb + i * n, n);
      if (st == 0) st = gemm('N', 'N', n, hd, n, 1.0f, p_g.Of(pb, n * n), n, v, c3, 0.0f, out + b * n * c + h * hd, c);
      if (st != 0) return 10 + st;
    }
    return 0;
  });
}

// AttnFwd(qkv (B, N, 3C), scale (1)) -> (out (B, N, C), p (B, H, N, N)), H from p's shape
template <bool kBf16>
int AttnFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 4 || !AllF32(nparam, dtypes) || ndims[0] != 3 || ndims[3] != 4) return 1;
  AttnDims d;
  if (!AttnDimsOf(shapes[0], shapes[3][1], &d) || !ShapeIs(ndims[2], shapes[2], {d.bsz, d.n, d.c}) ||
      !ShapeIs(ndims[3], shapes[3], {d.bsz, d.heads, d.n, d.n})) return 2;
  GemmInput<kBf16> qkv_g;
  return AttnCore<kBf16>(qkv_g.Of(static_cast<const float *>(params[0]), d.bsz * d.n * d.c3),
                         *static_cast<const float *>(params[1]), static_cast<float *>(params[2]),
                         static_cast<float *>(params[3]), d.bsz, d.n, d.c, d.heads);
}

// AttnInferFwd(qkv (B, N, 3C), scale (1), heads (1)) -> out (B, N, C): AttnFwd's out without
// writing p (B, H, N, N), the biggest tensor of the core, to memory (AttnRecomputeBwd recomputes it).
// kSave (bf16 only): -> (out, qkvb (B, N, 3C) bf16): qkv rounded to bf16, the GEMMs' input, given
// out so that the backward keeps it instead of qkv (half the memory; the same values it would round).
template <bool kBf16, bool kSave = kBf16>
int AttnInferFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != (kSave ? 5 : 4) || !DtypesAre(nparam, dtypes, kSave ? "ffffb" : "ffff") || ndims[0] != 3) return 1;
  AttnDims d;
  if (!AttnDimsOf(shapes[0], static_cast<int64_t>(*static_cast<const float *>(params[2])), &d) ||
      !ShapeIs(ndims[3], shapes[3], {d.bsz, d.n, d.c}) ||
      (kSave && !ShapeIs(ndims[4], shapes[4], {d.bsz, d.n, d.c3}))) return 2;
  GemmInput<kBf16> qkv_g;
  const auto *qkv_in = SavingTo<kBf16, kSave>(qkv_g, static_cast<const float *>(params[0]), kSave ? params[4] : nullptr,
                                              d.bsz * d.n * d.c3);
  return AttnCore<kBf16>(qkv_in, *static_cast<const float *>(params[1]), static_cast<float *>(params[3]), nullptr,
                         d.bsz, d.n, d.c, d.heads);
}

// The gradient of the attention core's out for qkv (B, N, 3C) -> dqkv (B, N, 3C):
//   dv = p^T dout,  dp = dout v^T,  ds = p * (dp - rowsum(dp * p)),  dq = scale ds k,  dk = scale ds^T q
// p (B, H, N, N) as AttnFwd wrote it, or nullptr: each (batch, head) task then recomputes its head's
// p into scratch with AttnCore's own GEMM call and softmax row, so it equals the forward's p bit for
// bit, and p never has to be kept between the forward and the backward (flash-attention style;
// costs one q k^T GEMM and one softmax per head).
// kBf16: the GEMM inputs (q, k, p, dout, v, ds) rounded to bf16; p and ds are computed in fp32.
// qkv_in is qkv in the GEMMs' precision, as for AttnCore.
template <bool kBf16>
int AttnBwdCore(const typename Precision<kBf16>::In *qkv_in, const float *p, const float *dout, float scale,
                float *dqkv, int64_t bsz, int64_t n, int64_t c, int64_t heads) {
  const auto gemm = Precision<kBf16>::Gemm();
  if (gemm == nullptr) return 3;
  const int64_t c3 = 3 * c, hd = c / heads;
  GemmInput<kBf16> dout_g;
  const auto *dout_in = dout_g.Of(dout, bsz * n * c);
  return ParallelStatus(bsz * heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> ds(static_cast<size_t>(n * n));
    std::vector<float> scratch(p == nullptr ? static_cast<size_t>(n * n) : 0);
    TaskGemmInput<kBf16> p_g, ds_g;
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const int64_t off = b * n * c3 + h * hd;
      const auto *q = qkv_in + off, *k = q + c, *v = q + 2 * c, *go = dout_in + b * n * c + h * hd;
      float *dq = dqkv + off, *dk = dq + c, *dv = dq + 2 * c;
      int st = 0;
      const float *pb = p ? p + bh * n * n : scratch.data();
      if (p == nullptr) {  // exactly AttnCore's first two steps
        st = gemm('N', 'T', n, n, hd, scale, q, c3, k, c3, 0.0f, scratch.data(), n);
        for (int64_t i = 0; i < n && st == 0; ++i) SoftmaxRow(scratch.data() + i * n, scratch.data() + i * n, n);
      }
      if (st == 0) st = gemm('T', 'N', n, hd, n, 1.0f, p_g.Of(pb, n * n), n, go, c, 0.0f, dv, c3);
      if (st == 0) st = gemm('N', 'T', n, n, hd, 1.0f, go, c, v, c3, 0.0f, ds.data(), n);
      for (int64_t i = 0; i < n && st == 0; ++i) SoftmaxGradRow(pb + i * n, ds.data() + i * n, ds.data() + i * n, n);
      const auto *dsi = st == 0 ? ds_g.Of(ds.data(), n * n) : nullptr;
      if (st == 0) st = gemm('N', 'N', n, hd, n, scale, dsi, n, k, c3, 0.0f, dq, c3);
      if (st == 0) st = gemm('T', 'N', n, hd, n, scale, dsi, n, q, c3, 0.0f, dk, c3);
      if (st != 0) return 10 + st;
    }
    return 0;
  });
}

// AttnBwd(qkv, p, dout, scale) -> dqkv (B, N, 3C), the gradient of AttnFwd's out, H from p's shape
template <bool kBf16>
int AttnBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5 || !AllF32(nparam, dtypes) || ndims[0] != 3 || ndims[1] != 4) return 1;
  AttnDims d;
  if (!AttnDimsOf(shapes[0], shapes[1][1], &d) || !ShapeIs(ndims[1], shapes[1], {d.bsz, d.heads, d.n, d.n}) ||
      !ShapeIs(ndims[2], shapes[2], {d.bsz, d.n, d.c}) || !ShapeIs(ndims[4], shapes[4], {d.bsz, d.n, d.c3})) return 2;
  GemmInput<kBf16> qkv_g;
  return AttnBwdCore<kBf16>(qkv_g.Of(static_cast<const float *>(params[0]), d.bsz * d.n * d.c3),
                            static_cast<const float *>(params[1]),
                            static_cast<const float *>(params[2]), *static_cast<const float *>(params[3]),
                            static_cast<float *>(params[4]), d.bsz, d.n, d.c, d.heads);
}

// AttnRecomputeBwd(qkv, dout, scale (1), heads (1)) -> dqkv (B, N, 3C): the gradient of
// AttnInferFwd's out, recomputing p per head (nothing but qkv is kept from the forward).
// kSaved: the first input is AttnInferFwd's qkvb (bf16 already).
template <bool kBf16, bool kSaved = kBf16>
int AttnRecomputeBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5 || !DtypesAre(nparam, dtypes, kSaved ? "bffff" : "fffff") || ndims[0] != 3) return 1;
  AttnDims d;
  if (!AttnDimsOf(shapes[0], static_cast<int64_t>(*static_cast<const float *>(params[3])), &d) ||
      !ShapeIs(ndims[1], shapes[1], {d.bsz, d.n, d.c}) || !ShapeIs(ndims[4], shapes[4], {d.bsz, d.n, d.c3})) return 2;
  GemmInput<kBf16> qkv_g;
  return AttnBwdCore<kBf16>(SavedOr<kBf16, kSaved>(qkv_g, params[0], d.bsz * d.n * d.c3), nullptr,
                            static_cast<const float *>(params[1]), *static_cast<const float *>(params[2]),
                            static_cast<float *>(params[4]), d.bsz, d.n, d.c, d.heads);
}

extern "C" {

// ---------------------------------------------------------------- attention head split
// QkvSplit(qkv (B, N, 3*H*hd), scale (1)) -> q, k, v each (B, H, N, hd); q is multiplied by
// scale. Equals reshape(B, N, 3, H, hd).transpose(2, 0, 3, 1, 4) then unbind(0), q * scale.
int RfQkvSplit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || !AllF32(nparam, dtypes) || ndims[0] != 3 || ndims[2] != 4) return 1;
  const float *qkv = static_cast<const float *>(params[0]);
  const float scale = *static_cast<const float *>(params[1]);
  float *out[3] = {static_cast<float *>(params[2]), static_cast<float *>(params[3]), static_cast<float *>(params[4])};
  const int64_t bsz = shapes[2][0], heads = shapes[2][1], n = shapes[2][2], hd = shapes[2][3];
  const int64_t c = heads * hd;
  if (shapes[0][0] != bsz || shapes[0][1] != n || shapes[0][2] != 3 * c) return 2;
  ParallelFor(bsz * n, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t bn = lo; bn < hi; ++bn) {
      const int64_t b = bn / n, t = bn % n;
      const float *src = qkv + bn * 3 * c;
      for (int s = 0; s < 3; ++s) {
        const float f = s == 0 ? scale : 1.0f;
        for (int64_t h = 0; h < heads; ++h) {
          const float *si = src + s * c + h * hd;
          float *di = out[s] + ((b * heads + h) * n + t) * hd;
#pragma omp simd
          for (int64_t j = 0; j < hd; ++j) di[j] = si[j] * f;
        }
      }
    }
  });
  return 0;
}

// QkvMerge(dq, dk, dv (B, H, N, hd), scale (1)) -> dqkv (B, N, 3*H*hd); the gradient of QkvSplit
int RfQkvMerge(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || !AllF32(nparam, dtypes) || ndims[0] != 4 || ndims[4] != 3) return 1;
  const float *in[3] = {static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                        static_cast<const float *>(params[2])};
  const float scale = *static_cast<const float *>(params[3]);
  float *dqkv = static_cast<float *>(params[4]);
  const int64_t bsz = shapes[0][0], heads = shapes[0][1], n = shapes[0][2], hd = shapes[0][3];
  const int64_t c = heads * hd;
  if (shapes[4][0] != bsz || shapes[4][1] != n || shapes[4][2] != 3 * c) return 2;
  ParallelFor(bsz * n, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t bn = lo; bn < hi; ++bn) {
      const int64_t b = bn / n, t = bn % n;
      float *dst = dqkv + bn * 3 * c;
      for (int s = 0; s < 3; ++s) {
        const float f = s == 0 ? scale : 1.0f;
        for (int64_t h = 0; h < heads; ++h) {
          const float *si = in[s] + ((b * heads + h) * n + t) * hd;
          float *di = dst + s * c + h * hd;
#pragma omp simd
          for (int64_t j = 0; j < hd; ++j) di[j] = si[j] * f;
        }
      }
    }
  });
  return 0;
}

// ---------------------------------------------------------------- Linear (oneDNN GEMM)
// Which GEMMs are there: bit 0 fp32, bit 1 bf16 (called through ctypes, not as an operator).
int RfGemmAvailable() { return (GetDnnl().sgemm ? 1 : 0) | (GetDnnl().bf16 ? 2 : 0); }

// Packed bf16 weights for the Linear forward (see WeightCache): on != 0 switches them on, 0 off
// (freeing every packed copy). Returns the previous state. Called through ctypes.
int RfSetWeightCache(int on) { return WeightCache::Get().SetActive(on != 0); }

// How long the pool's threads poll before blocking (see Pool), in microseconds; negative: only
// read it. Returns the value before the call.
int64_t RfPoolSpinUs(int64_t us) {
  Pool &pool = Pool::Get();
  if (us < 0) return pool.SpinUs();
  return pool.SetSpinUs(static_cast<long>(us));
}

// 1 when oneDNN's matmul primitive API was found (the packed path can run), else 0.
int RfPackedMatmulAvailable() { return GetMatmul().ok ? 1 : 0; }

// The packed-weight cache: what 0 -> weights held, 1 -> their bytes, 2 -> packs made since the
// library was loaded, 3 -> Linear forwards that tried the packed path since then.
int64_t RfWeightCacheStat(int what) { return WeightCache::Get().Stat(what); }

// fp32 Linear weights packed in place (see InPlacePacks; called through ctypes by
// cpu_kernels.frozen_weights). RfPackInPlace packs count weights ws[i] (ns[i], ks[i]), at most
// kReorderLanes at once, and writes each one's status (0 packed, 1 already packed or a repeated
// address, 2 shape not packable in place, 3 failed) into status; RfUnpackAllInPlace restores them
// all and returns how many it could not; RfInPlaceStat: 0 -> weights packed now, 1 -> fp32 Linear
// forwards that used one since loading, 2 -> weights packed now that no forward has read through
// the packed path since they were packed; RfInPlaceForceFallback (tests) forces LinearInPlace's
// fallback path.
int RfPackInPlace(int64_t count, float **ws, const int64_t *ns, const int64_t *ks, int32_t *status) {
  if (!GetMatmul().ok) return 1;
  std::vector<char> duplicate(static_cast<size_t>(std::max<int64_t>(count, 0)), 0);
  for (int64_t i = 0; i < count; ++i) {  // the same storage twice would be reordered twice
    for (int64_t j = 0; j < i && !duplicate[i]; ++j) duplicate[i] = ws[j] == ws[i];
  }
  ForEachInLanes(count, [&](int64_t i) { status[i] = duplicate[i] ? 1 : InPlacePacks::Get().Pack(ws[i], ns[i], ks[i]); });
  return 0;
}
void RfInPlaceForceFallback(int on) { g_in_place_force_fallback.store(on != 0); }
int64_t RfUnpackAllInPlace() { return InPlacePacks::Get().UnpackAll(); }
int64_t RfInPlaceStat(int what) {
  InPlacePacks &packs = InPlacePacks::Get();
  return what == 0 ? packs.Count() : what == 1 ? packs.Calls() : what == 2 ? packs.Unread() : -1;
}

// 1 when this build has the AVX-512 code paths (softmax rows), 0 for the portable loops.
int RfAvx512Build() {
#ifdef RF_AVX512
  return 1;
#else
  return 0;
#endif
}


// The AOT entry points of the templated kernels (MindSpore's signature; the stream and extra
// arguments are unused).
#define RF_AOT_ENTRY(name, impl)                                                                        \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) { \
    return impl(nparam, params, ndims, shapes, dtypes);                                                  \
  }
// Linear: LinearFwd(x (.., K), w (N, K), b (N)) -> y (.., N); LinearBwd(x, w, dy) -> (dx, dw, db)
RF_AOT_ENTRY(RfLinearFwd, LinearFwd<false>)
RF_AOT_ENTRY(RfLinearBwd, LinearBwd<false>)
// The same with bf16 GEMM inputs (fp32 accumulation, fp32 outputs and bias):
// RfLinearBf16Fwd(x, w, b) -> (y, xb bf16); RfLinearBf16Bwd(xb, w, dy) -> (dx, dw, db)
RF_AOT_ENTRY(RfLinearBf16Fwd, LinearFwd<true>)
RF_AOT_ENTRY(RfLinearBf16Bwd, LinearBwd<true>)
// ... without the saved copy (PyNative, whose autograd keeps a custom op's inputs anyway):
// RfLinearBf16NoSaveFwd(x, w, b) -> y; RfLinearBf16NoSaveBwd(x, w, dy) -> (dx, dw, db)
RF_AOT_ENTRY(RfLinearBf16NoSaveFwd, (LinearFwd<true, false>))
RF_AOT_ENTRY(RfLinearBf16NoSaveBwd, (LinearBwd<true, false>))
// Attention core: fp32, and with bf16 GEMM inputs (see AttnFwd)
RF_AOT_ENTRY(RfAttnFwd, AttnFwd<false>)
RF_AOT_ENTRY(RfAttnBwd, AttnBwd<false>)
RF_AOT_ENTRY(RfAttnBf16Fwd, AttnFwd<true>)
RF_AOT_ENTRY(RfAttnBf16Bwd, AttnBwd<true>)
// ... and without the p output (evaluation)
RF_AOT_ENTRY(RfAttnInferFwd, AttnInferFwd<false>)
RF_AOT_ENTRY(RfAttnBf16InferFwd, AttnInferFwd<true>)
// The backward of the two above, recomputing p (see AttnBwdCore)
RF_AOT_ENTRY(RfAttnRecomputeBwd, AttnRecomputeBwd<false>)
RF_AOT_ENTRY(RfAttnBf16RecomputeBwd, AttnRecomputeBwd<true>)
// bf16 without the saved qkvb copy (PyNative), as for Linear
RF_AOT_ENTRY(RfAttnBf16NoSaveInferFwd, (AttnInferFwd<true, false>))
RF_AOT_ENTRY(RfAttnBf16NoSaveRecomputeBwd, (AttnRecomputeBwd<true, false>))
#undef RF_AOT_ENTRY

}  // extern "C"
