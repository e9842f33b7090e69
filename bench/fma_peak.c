/* The CPU's fused multiply-add rate, the "% peak" basis of python -m bench (bench/peak.py).

   Each thread runs CHAINS independent accumulator chains, one vector register each, so the
   FMA units never wait on a previous result (latency 4 cycles, up to 2 FMAs per cycle: 8
   chains in flight are needed, the kernels keep 12 or 16). Every kernel writes its final
   accumulators to `out` (threads x chains x lanes floats), which keeps the compiler from
   dropping the loop and lets tests/test_bench.py check the arithmetic against numpy.

   Built by bench/peak.py with the system C compiler (-O2 -fopenmp -shared); each kernel is
   compiled for its instruction set by a target attribute and picked at run time by the
   caller from /proc/cpuinfo, so the library loads on any x86-64 CPU. Without FMA_PEAK_BF16
   (a compiler that knows no avx512bf16) the bf16 kernel is left out. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define AVX512_CHAINS 16
#define AVX2_CHAINS 12

/* out[t, j, :] after `iterations` of acc = acc * multiplier + addend, acc starting at j + 1. */
__attribute__((target("avx512f"))) void fma_peak_f32_avx512(int threads, int64_t iterations,
                                                            float multiplier, float addend,
                                                            float *out) {
#pragma omp parallel num_threads(threads)
  {
    const __m512 m = _mm512_set1_ps(multiplier), c = _mm512_set1_ps(addend);
    __m512 acc[AVX512_CHAINS];
    for (int j = 0; j < AVX512_CHAINS; ++j) acc[j] = _mm512_set1_ps((float)(j + 1));
    for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
      for (int j = 0; j < AVX512_CHAINS; ++j) acc[j] = _mm512_fmadd_ps(acc[j], m, c);
    }
    float *mine = out + (int64_t)omp_get_thread_num() * AVX512_CHAINS * 16;
    for (int j = 0; j < AVX512_CHAINS; ++j) _mm512_storeu_ps(mine + 16 * j, acc[j]);
  }
}

__attribute__((target("avx2,fma"))) void fma_peak_f32_avx2(int threads, int64_t iterations,
                                                           float multiplier, float addend,
                                                           float *out) {
#pragma omp parallel num_threads(threads)
  {
    const __m256 m = _mm256_set1_ps(multiplier), c = _mm256_set1_ps(addend);
    __m256 acc[AVX2_CHAINS];
    for (int j = 0; j < AVX2_CHAINS; ++j) acc[j] = _mm256_set1_ps((float)(j + 1));
    for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
      for (int j = 0; j < AVX2_CHAINS; ++j) acc[j] = _mm256_fmadd_ps(acc[j], m, c);
    }
    float *mine = out + (int64_t)omp_get_thread_num() * AVX2_CHAINS * 8;
    for (int j = 0; j < AVX2_CHAINS; ++j) _mm256_storeu_ps(mine + 8 * j, acc[j]);
  }
}

#ifdef FMA_PEAK_BF16
/* out[t, j, :] after `iterations` of acc += a * b + a * b (vdpbf16ps: a pair of bfloat16
   products per float32 lane), acc starting at j + 1; a and b are the bfloat16 bit patterns. */
__attribute__((target("avx512f,avx512bf16"))) void fma_peak_bf16_avx512(int threads,
                                                                        int64_t iterations,
                                                                        uint16_t a, uint16_t b,
                                                                        float *out) {
#pragma omp parallel num_threads(threads)
  {
    const __m512bh left = (__m512bh)_mm512_set1_epi16((short)a);
    const __m512bh right = (__m512bh)_mm512_set1_epi16((short)b);
    __m512 acc[AVX512_CHAINS];
    for (int j = 0; j < AVX512_CHAINS; ++j) acc[j] = _mm512_set1_ps((float)(j + 1));
    for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
      for (int j = 0; j < AVX512_CHAINS; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], left, right);
    }
    float *mine = out + (int64_t)omp_get_thread_num() * AVX512_CHAINS * 16;
    for (int j = 0; j < AVX512_CHAINS; ++j) _mm512_storeu_ps(mine + 16 * j, acc[j]);
  }
}
#endif

/* Chains and float32 lanes per thread of each kernel, and flops per lane per iteration. */
int fma_peak_f32_avx512_shape[3] = {AVX512_CHAINS, 16, 2};
int fma_peak_f32_avx2_shape[3] = {AVX2_CHAINS, 8, 2};
int fma_peak_bf16_avx512_shape[3] = {AVX512_CHAINS, 16, 4};
