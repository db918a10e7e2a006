/* Batch normalization kernels of our own (Ioffe & Szegedy 2015, Algorithms 1 and 2; docs/design.md §1).
 *
 * Loaded by bnexp/nn/kernel.py through ctypes, compiled on first use with the system C compiler. Input is
 * contiguous (N, C, L) data: L = 1 for (N, C), L = the plane size (H·W, D·H·W, or L) for NC* data. The
 * body is bn_kernel_body.h, included once per element type.
 *
 * Why a kernel: built from general tensor ops, training forward+backward makes about a dozen full passes
 * and a dozen op dispatches; here it makes the minimum of two per direction (forward: the statistics,
 * then y; backward: the two reductions, then dx) and one foreign call each.
 *
 * Accuracy: statistics accumulate in double, shifted by each channel's first value, so the one-pass
 * Σ(x−K) and Σ(x−K)² do not cancel (the error grows with (μ−K)²/σ², and K is a value of the channel);
 * the backward's Σg·(x−μ) is also accumulated in double. y and dx are formed from x − μ rather than
 * x·k + shift, so inputs with a large mean lose nothing to cancellation in T either.
 *
 * Loops stream memory once, in order. For L = 1 the inner loop runs over channels with one accumulator
 * per channel; for L > 1 it runs over a plane with LANES partial sums. `omp simd` asks for vector code.
 * NC* data is processed in blocks of whole channels small enough to stay in cache (bn_kernel_body.h's
 * BLOCK_BYTES): a block's first pass (statistics, or the backward's sums) brings its part of the inputs
 * in, and its second pass (y, or dx) reads them from there, so large inputs come from memory once per
 * direction rather than twice. A channel's sums are the same whatever the block.
 *
 * Threads: each entry point splits the channels into contiguous ranges, one per thread, and a thread
 * computes its channels' statistics, coefficients and outputs alone, so there is no barrier between
 * passes, and a channel's sums are added in the same order whatever the thread count (results do not
 * depend on it). kernel.py builds with -fopenmp only where torch's own OpenMP runtime (libgomp.so.1) is
 * loaded, so these parallel regions run on torch's thread pool with torch.get_num_threads() threads,
 * never on a second runtime competing with it; elsewhere it builds without, and everything runs on the
 * calling thread. Inputs below bn_parallel_min elements run on the calling thread: waking the pool
 * costs more than it saves there (benchmarks/README.md has the measurements).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

static int64_t parallel_min = 32768;

/* Inputs of fewer elements than this run on one thread (kernel.py may set it; tests force threads). */
void bn_set_parallel_min(int64_t numel) { parallel_min = numel; }

/* 1 when this build runs parallel regions on an OpenMP runtime, else 0. */
int bn_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#ifdef _OPENMP
static int bn_threads(int64_t numel, int64_t C)
{
    if (numel < parallel_min || C < 2 || omp_in_parallel()) return 1;
    int nt = omp_get_max_threads();
    return nt < C ? nt : (int)C;
}

/* Run `body` with c0, c1 bound to this thread's range of the C channels. */
#define BN_PARALLEL_CHANNELS(numel, C, body)                                     \
    do {                                                                         \
        const int nt_ = bn_threads((numel), (C));                                \
        if (nt_ > 1) {                                                           \
            _Pragma("omp parallel num_threads(nt_)")                             \
            {                                                                    \
                const int64_t t_ = omp_get_thread_num(), n_ = omp_get_num_threads(); \
                const int64_t c0 = (C) * t_ / n_, c1 = (C) * (t_ + 1) / n_;       \
                body;                                                            \
            }                                                                    \
        } else {                                                                 \
            const int64_t c0 = 0, c1 = (C);                                      \
            body;                                                                \
        }                                                                        \
    } while (0)
/* Two phases, a barrier between: `first` with c0, c1 bound to this thread's channels, then `second` with
 * r0, r1 bound to its rows. For (N, C) data, where a channel is a column: the statistics need whole
 * channels, but the elementwise pass streams memory better in whole rows. */
#define BN_PARALLEL_CHANNELS_THEN_ROWS(numel, C, N, first, second)              \
    do {                                                                         \
        const int nt_ = bn_threads((numel), (C));                                \
        if (nt_ > 1) {                                                           \
            _Pragma("omp parallel num_threads(nt_)")                             \
            {                                                                    \
                const int64_t t_ = omp_get_thread_num(), n_ = omp_get_num_threads(); \
                {                                                                \
                    const int64_t c0 = (C) * t_ / n_, c1 = (C) * (t_ + 1) / n_;   \
                    first;                                                       \
                }                                                                \
                _Pragma("omp barrier")                                           \
                {                                                                \
                    const int64_t r0 = (N) * t_ / n_, r1 = (N) * (t_ + 1) / n_;   \
                    second;                                                      \
                }                                                                \
            }                                                                    \
        } else {                                                                 \
            { const int64_t c0 = 0, c1 = (C); first; }                           \
            { const int64_t r0 = 0, r1 = (N); second; }                          \
        }                                                                        \
    } while (0)
#else
#define BN_PARALLEL_CHANNELS_THEN_ROWS(numel, C, N, first, second) \
    do {                                                           \
        (void)(numel);                                             \
        { const int64_t c0 = 0, c1 = (C); first; }                 \
        { const int64_t r0 = 0, r1 = (N); second; }                \
    } while (0)
#define BN_PARALLEL_CHANNELS(numel, C, body) \
    do {                                     \
        (void)(numel);                       \
        const int64_t c0 = 0, c1 = (C);      \
        body;                                \
    } while (0)
#endif

#define T float
#define NAME(f) f##_f32
#include "bn_kernel_body.h"
#undef T
#undef NAME

#define T double
#define NAME(f) f##_f64
#include "bn_kernel_body.h"
#undef T
#undef NAME

/* Ask for transparent huge pages over the 2 MiB-aligned interior of a fresh, untouched buffer.
 *
 * A fresh output of tens of MB (y, dx) is mapped anew by the allocator on every call and each 4 KiB page
 * then faults in on first write: measured at 128x64x32x32 float32, that costs about as much as the
 * kernel's own passes over it (8.9 ms against 3.1 ms for the same write with huge pages). This is what
 * torch's THP_MEM_ALLOC_ENABLE does for every tensor; we do it for the layer's own outputs only.
 * Returns 0 when advised, 1 when there is nothing to advise or no such facility, -1 if madvise refused. */
int bn_advise_hugepages(void *p, int64_t nbytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)p + (uintptr_t)nbytes) & ~(huge - 1);
    if (end <= start) return 1;
    return madvise((void *)start, end - start, MADV_HUGEPAGE) == 0 ? 0 : -1;
#else
    (void)p;
    (void)nbytes;
    return 1;
#endif
}
