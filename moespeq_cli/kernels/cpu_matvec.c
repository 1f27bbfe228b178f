/* moespeq's decode-shaped CPU kernels: y = x W^T for a few rows of activations.
 *
 * Decoding on the CPU is a matrix-vector product over weights that stream from DRAM once
 * per token, so its speed limit is bytes of weight / memory bandwidth. These kernels read
 * each weight once per block of up to four tokens, widen bf16 (or fp16) weights to fp32 in
 * registers and accumulate in fp32, and split the output rows over a small pool of
 * threads: the activations stay fp32, the weights stay in the checkpoint's dtype.
 *
 * Batch invariance: the value of y[t][n] is computed by the same sequence of fp32
 * operations (16-wide FMAs over k in order, a masked tail, one fixed horizontal sum)
 * whatever T is and whichever block or thread computes it, so a verification pass over
 * k+1 tokens and k+1 single-token passes give bit-identical rows. That is what lets the
 * CPU keep bf16 weights and still promise lossless speculative decoding.
 *
 * Built by moespeq_cli/kernels/build.py with the system C compiler (-O3 -march=native),
 * loaded with ctypes. Three paths, each batch invariant on its own (the order of a row's
 * operations is fixed by k alone): AVX-512 (16-wide, four partial sums a row and token),
 * AVX2 with FMA and F16C (8-wide, two partial sums: AMD Zen 2/3, Intel client CPUs since
 * Alder Lake, where a plain loop ran 4x slower than torch's bf16 GEMV), and plain C for
 * the rest. Results differ between paths in the last bits (a different order of sums),
 * never between batch sizes on one machine.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MS_AVX512 1
#else
#define MS_AVX512 0
#endif
#if !MS_AVX512 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MS_AVX2 1
#else
#define MS_AVX2 0
#endif
#if MS_AVX512 || defined(__F16C__)
#include <immintrin.h> /* AVX2 machines use its _cvtsh_ss for fp16 weights (else the library fails to load) */
#endif

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };

#define MS_T 4 /* tokens per step */
#define MAX_MOE_ROWS 64 /* kernels/__init__.py MAX_ROWS: the most tokens ``ms_moe`` takes */
/* CALL(TB) with TB the size of the block of tokens starting here, as a constant 1..MS_T:
 * each kernel's sums for a block then stay in registers */
#define MS_BY_BLOCK(left, CALL)                                                                                      \
    switch ((left) < MS_T ? (left) : MS_T) {                                                                         \
    case 1: CALL(1); break;                                                                                          \
    case 2: CALL(2); break;                                                                                          \
    case 3: CALL(3); break;                                                                                          \
    default: CALL(4); break;                                                                                         \
    }

int ms_version(void) { return 16; }
int ms_simd(void) { return MS_AVX512 ? 512 : (MS_AVX2 ? 256 : 0); }
#if MS_AVX512 && defined(__AVX512BF16__)
#define MS_BF16DOT 1
#else
#define MS_BF16DOT 0
#endif
/* the 4-bit (draft) kernel's numerics: 1 = bf16 weights and activations, fp32 sums */
int ms_nf4_bf16(void) { return MS_BF16DOT; }

/* ------------------------------------------------------------------------------------ */
/* One block: rows [n0, n1) of W (row stride K elements) against tokens [t0, t0 + tb).   */

static inline float widen_scalar(const void *w, int wt, long i) {
    if (wt == W_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (wt == W_BF16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    /* fp16 -> fp32, exact */
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0x1f) u = s | 0x7f800000 | (m << 13);
    else if (e) u = s | ((e + 112) << 23) | (m << 13);
    else if (!m) u = s;
    else { e = 113; while (!(m & 0x400)) { m <<= 1; e--; } u = s | (e << 23) | ((m & 0x3ff) << 13); }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

#if MS_AVX512 || MS_AVX2 /* 256-bit FMA: the AVX2 path, and attention on either SIMD path */
/* the lanes' sum in a fixed order: halves, then pairs, then the last two */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if MS_AVX512
static inline __attribute__((always_inline)) __m512 load_w(const void *w, int wt, long off, __mmask16 m) {
    if (wt == W_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + off);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + off);
    if (wt == W_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

#define MS_PF 8192 /* bytes of weight prefetched ahead */

/* Weight rows against tokens t..t+TB (TB <= 4): R (1 or 2) rows at once, row r being row
 * n[r] of w[r] (of K weights) into y[r][t * ldy + n[r]]. Each (row, token) keeps four
 * partial sums, chunk c = k/16 going to sum c % 4, summed (s0 + s1) + (s2 + s3) then
 * across lanes: an order fixed by k alone, whatever R is. Each row is read as one
 * sequential stream; two rows far apart in memory (two matrices, or two halves of a
 * chunk) are two streams. On an AMD Zen 4 VM (2 vCPUs) one core streams about 22 GB/s
 * from one row at a time where a plain reduction reads 26-32: two streams a core, left to
 * the hardware prefetcher, decoded the 791M checkpoint in bf16 5-10% faster (a C loop
 * over two streams read 12-20% faster than over one); with the software prefetch of one
 * stream added to each, slower than one stream. Rows next to each other read interleaved
 * measured at half the bandwidth on an earlier machine: the pairs are half a chunk apart
 * (about 32 KB, less in a short last chunk) or in two matrices. Pairs are for one or two
 * tokens only (decoding): with more, the loop is no longer DRAM-bound. */
static inline __attribute__((always_inline)) void row_block_r(const float *x, long ldx, const void *const *w,
                                                                const long *n, float *const *y, int wt, long K,
                                                                long ldy, int TB, int R) {
    __m512 acc[2][MS_T][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < MS_T; t++)
            for (int j = 0; j < 4; j++) acc[r][t][j] = _mm512_setzero_ps();
    long k = 0;
    for (; k + 64 <= K; k += 64) {
        if (R == 1) { /* one stream: prefetch into L2 8 KB ahead (measured: 1.1-1.5x the hardware prefetcher alone) */
            const char *p = (const char *)w[0] + (n[0] * K + k) * (wt == W_F32 ? 4 : 2) + MS_PF;
            _mm_prefetch(p, _MM_HINT_T1);
            _mm_prefetch(p + 64, _MM_HINT_T1);
            if (wt == W_F32) {
                _mm_prefetch(p + 128, _MM_HINT_T1);
                _mm_prefetch(p + 192, _MM_HINT_T1);
            }
        }
        for (int j = 0; j < 4; j++)
            for (int r = 0; r < R; r++) {
                __m512 wv = load_w(w[r], wt, n[r] * K + k + 16 * j, 0xffff);
                for (int t = 0; t < TB; t++)
                    acc[r][t][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * ldx + k + 16 * j), acc[r][t][j]);
            }
    }
    /* the tail: up to four chunks, the last one masked (constant indices keep acc in registers) */
#define MS_TAIL(j)                                                                                                   \
    if (k < K) {                                                                                                     \
        __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);                           \
        for (int r = 0; r < R; r++) {                                                                                \
            __m512 wv = load_w(w[r], wt, n[r] * K + k, m);                                                          \
            for (int t = 0; t < TB; t++)                                                                             \
                acc[r][t][j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + t * ldx + k), acc[r][t][j]);       \
        }                                                                                                            \
        k += 16;                                                                                                     \
    }
    MS_TAIL(0) MS_TAIL(1) MS_TAIL(2) MS_TAIL(3)
#undef MS_TAIL
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TB; t++)
            y[r][t * ldy + n[r]] = _mm512_reduce_add_ps(
                _mm512_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]), _mm512_add_ps(acc[r][t][2], acc[r][t][3])));
}

static inline __attribute__((always_inline)) void row_block(const float *x, long ldx, const void *w, int wt, long K,
                                                              float *y, long ldy, long n, int TB) {
    row_block_r(x, ldx, &w, &n, &y, wt, K, ldy, TB, 1);
}

/* rows a of wa and b of wb, as two streams */
static inline __attribute__((always_inline)) void row_pair(const float *x, long ldx, const void *wa, long a, float *ya,
                                                             const void *wb, long b, float *yb, int wt, long K,
                                                             long ldy, int TB) {
    const void *w[2] = {wa, wb};
    const long n[2] = {a, b};
    float *const y[2] = {ya, yb};
    row_block_r(x, ldx, w, n, y, wt, K, ldy, TB, 2);
}
#define MS_PAIRS 1 /* row_pair exists: rows_wt reads two streams a core when T <= 2 */

#elif MS_AVX2
/* 8 weights at w + off widened to fp32; ``n`` < 8 of them (a row's tail) read through a
 * zeroed copy, so no load passes the row's end. */
static inline __attribute__((always_inline)) __m256 load_w8(const void *w, int wt, long off) {
    if (wt == W_F32) return _mm256_loadu_ps((const float *)w + off);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + off));
    if (wt == W_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static inline __m256 load_part8(const void *p, long elem, long n) {
    float tmp[8] = {0};
    memcpy(tmp, p, (size_t)(n * elem));
    return _mm256_loadu_ps(tmp);
}

static inline __m256 load_w8_part(const void *w, int wt, long off, long n) {
    if (wt == W_F32) return load_part8((const float *)w + off, 4, n);
    uint16_t tmp[8] = {0};
    memcpy(tmp, (const uint16_t *)w + off, (size_t)(n * 2));
    return load_w8(tmp, wt, 0);
}

/* table[idx] for eight 4-bit indices, from a 16-entry table in two registers (lo: entries
 * 0-7, hi: 8-15): both halves looked up, bit 3 of the index picks one */
static inline __m256 lut16(__m256 lo, __m256 hi, __m256i idx) {
    __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* acc[t][j] += w[c] * x[t][c * 8 ..] for the chunks c of a 32-weight group in a fixed
 * order (j = c % 2), the inner step of the 4-bit kernels */
static inline __attribute__((always_inline)) void fma_group8(__m256 (*acc)[2], int TB, const __m256 *w, const float *x,
                                                               long ldx) {
    for (int c = 0; c < 4; c++)
        for (int t = 0; t < TB; t++)
            acc[t][c & 1] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(x + t * ldx + 8 * c), acc[t][c & 1]);
}

#define MS_PF 8192 /* bytes of weight prefetched ahead */

/* One weight row against tokens t..t+TB (TB <= 4). Each (row, token) keeps two partial
 * sums, chunk c = k/8 going to sum c % 2 (16 ymm registers: eight sums, a weight and an
 * activation), summed s0 + s1 then across lanes: an order fixed by k alone. */
static inline __attribute__((always_inline)) void row_block(const float *x, long ldx, const void *w, int wt, long K,
                                                              float *y, long ldy, long n, int TB) {
    __m256 acc[MS_T][2];
    for (int t = 0; t < MS_T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    long base = n * K, k = 0, e = wt == W_F32 ? 4 : 2;
    for (; k + 32 <= K; k += 32) {
        const char *p = (const char *)w + (base + k) * e + MS_PF; /* as the AVX-512 path's one stream */
        _mm_prefetch(p, _MM_HINT_T1);
        if (wt == W_F32) _mm_prefetch(p + 64, _MM_HINT_T1);
        for (int j = 0; j < 4; j++) {
            __m256 wv = load_w8(w, wt, base + k + 8 * j);
            for (int t = 0; t < TB; t++)
                acc[t][j & 1] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + k + 8 * j), acc[t][j & 1]);
        }
    }
    /* the tail: up to four chunks (k/8 is even here), the last one possibly partial */
#define MS_TAIL8(j)                                                                                                  \
    if (k < K) {                                                                                                     \
        long m = K - k < 8 ? K - k : 8;                                                                              \
        __m256 wv = m == 8 ? load_w8(w, wt, base + k) : load_w8_part(w, wt, base + k, m);                           \
        for (int t = 0; t < TB; t++) {                                                                               \
            __m256 xv = m == 8 ? _mm256_loadu_ps(x + t * ldx + k) : load_part8(x + t * ldx + k, 4, m);              \
            acc[t][j] = _mm256_fmadd_ps(wv, xv, acc[t][j]);                                                          \
        }                                                                                                            \
        k += 8;                                                                                                      \
    }
    MS_TAIL8(0) MS_TAIL8(1) MS_TAIL8(0) MS_TAIL8(1)
#undef MS_TAIL8
    for (int t = 0; t < TB; t++) y[t * ldy + n] = hsum8(_mm256_add_ps(acc[t][0], acc[t][1]));
}

#endif

#if MS_AVX512 || MS_AVX2
static inline __attribute__((always_inline)) void rows_wt(const float *x, long ldx, const void *w, int wt, long K,
                                                            float *y, long ldy, long T, long n0, long n1) {
#ifdef MS_PAIRS
    if (T == 1 || T == 2) { /* decoding: the rows' two halves as two streams (each row computed as alone) */
        long h = (n1 - n0 + 1) / 2;
        for (long n = n0; n < n0 + h; n++) {
#define MS_CALL(tb)                                                                                                  \
    if (n + h < n1) row_pair(x, ldx, w, n, y, w, n + h, y, wt, K, ldy, tb);                                         \
    else row_block(x, ldx, w, wt, K, y, ldy, n, tb)
            if (T == 1) { MS_CALL(1); } else { MS_CALL(2); }
#undef MS_CALL
        }
        return;
    }
#endif
    for (long n = n0; n < n1; n++)
        for (long t = 0; t < T; t += MS_T) { /* the row stays in L1 across token blocks */
            const float *xt = x + t * ldx;
            float *yt = y + t * ldy;
            /* constant trip counts keep acc in registers */
#define MS_CALL(tb) row_block(xt, ldx, w, wt, K, yt, ldy, n, tb)
            MS_BY_BLOCK(T - t, MS_CALL)
#undef MS_CALL
        }
}

/* one specialised copy per weight dtype: the widening is then branch-free */
static void rows(const float *x, long ldx, const void *w, int wt, long K, float *y, long ldy, long T, long n0, long n1) {
    switch (wt) {
    case W_F32: rows_wt(x, ldx, w, W_F32, K, y, ldy, T, n0, n1); break;
    case W_BF16: rows_wt(x, ldx, w, W_BF16, K, y, ldy, T, n0, n1); break;
    default: rows_wt(x, ldx, w, W_F16, K, y, ldy, T, n0, n1); break;
    }
}

/* rows [n0, n1) of two matrices of one shape and the same x (an expert's gate and up):
 * row n of each together, as two streams, when T <= 2 */
static inline __attribute__((always_inline)) void rows2_wt(const float *x, long ldx, const void *wa, const void *wb,
                                                             int wt, long K, float *ya, float *yb, long ldy, long T,
                                                             long n0, long n1) {
#ifdef MS_PAIRS
    if (T == 1 || T == 2) {
        for (long n = n0; n < n1; n++) {
            if (T == 1) row_pair(x, ldx, wa, n, ya, wb, n, yb, wt, K, ldy, 1);
            else row_pair(x, ldx, wa, n, ya, wb, n, yb, wt, K, ldy, 2);
        }
        return;
    }
#endif
    rows_wt(x, ldx, wa, wt, K, ya, ldy, T, n0, n1);
    rows_wt(x, ldx, wb, wt, K, yb, ldy, T, n0, n1);
}

static void rows2(const float *x, long ldx, const void *wa, const void *wb, int wt, long K, float *ya, float *yb,
                  long ldy, long T, long n0, long n1) {
    switch (wt) {
    case W_F32: rows2_wt(x, ldx, wa, wb, W_F32, K, ya, yb, ldy, T, n0, n1); break;
    case W_BF16: rows2_wt(x, ldx, wa, wb, W_BF16, K, ya, yb, ldy, T, n0, n1); break;
    default: rows2_wt(x, ldx, wa, wb, W_F16, K, ya, yb, ldy, T, n0, n1); break;
    }
}
#else
/* Plain C: 16 partial sums per (row, token), k in order, then summed pairwise: a fixed
 * order whatever T is. */
static void rows(const float *x, long ldx, const void *w, int wt, long K, float *y, long ldy, long T, long n0, long n1) {
    for (long n = n0; n < n1; n++)
        for (long t = 0; t < T; t++) {
            float p[16] = {0};
            const float *xt = x + t * ldx;
            for (long k = 0; k < K; k++) p[k & 15] += widen_scalar(w, wt, n * K + k) * xt[k];
            for (int s = 8; s; s >>= 1)
                for (int i = 0; i < s; i++) p[i] += p[i + s];
            y[t * ldy + n] = p[0];
        }
}

static void rows2(const float *x, long ldx, const void *wa, const void *wb, int wt, long K, float *ya, float *yb,
                  long ldy, long T, long n0, long n1) {
    rows(x, ldx, wa, wt, K, ya, ldy, T, n0, n1);
    rows(x, ldx, wb, wt, K, yb, ldy, T, n0, n1);
}
#endif

/* ------------------------------------------------------------------------------------ */
/* A small thread pool: thread 0 is the caller; workers spin briefly, then sleep on a     */
/* futex. A job's rows are cut into chunks that every participant claims from a shared   */
/* counter, so the caller never waits for a worker that is slow to wake: on a VM a vCPU   */
/* idle for a few ms took 1-5 ms to come back, and with a fixed half per thread each call */
/* after an I/O wait cost that much. A worker joins the job that is open when it wakes;   */
/* the caller closes the job once it has run out of chunks and waits only for workers     */
/* that joined (they are running). Which thread computes a row does not change it: each  */
/* row's sums are its own (read alone or beside another), so results are the same        */
/* whoever claims what.                                                                   */

typedef void (*job_fn)(void *arg);
#define MS_MAX_THREADS 64
#define OPEN 0x40000000

static struct {
    int nth;
    pthread_t th[MS_MAX_THREADS];
    _Atomic uint32_t gen;    /* bumped to start a job */
    _Atomic int state;       /* OPEN while workers may join, plus the number running it */
    job_fn fn;
    void *arg;
    int spin;                /* pause iterations before sleeping */
    _Atomic int hold;        /* while above 0 workers never sleep (ms_hold) */
} pool = {.nth = 1};

static void futex_wait(_Atomic uint32_t *a, uint32_t v) { syscall(SYS_futex, a, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0); }
static void futex_wake(_Atomic uint32_t *a) { syscall(SYS_futex, a, FUTEX_WAKE_PRIVATE, MS_MAX_THREADS, NULL, NULL, 0); }

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

/* Join the open job, if any: one more running it. */
static int join(void) {
    int s = atomic_load_explicit(&pool.state, memory_order_acquire);
    while (s & OPEN)
        if (atomic_compare_exchange_weak_explicit(&pool.state, &s, s + 1, memory_order_acq_rel, memory_order_acquire))
            return 1;
    return 0;
}

static void *worker(void *p) {
    (void)p;
    uint32_t seen = 0;
    for (;;) {
        int i = 0;
        while (atomic_load_explicit(&pool.gen, memory_order_acquire) == seen) {
            if (++i < pool.spin || atomic_load_explicit(&pool.hold, memory_order_relaxed)) cpu_relax();
            else futex_wait(&pool.gen, seen);
        }
        seen = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (join()) {
            seen = atomic_load_explicit(&pool.gen, memory_order_acquire); /* stable while joined */
            pool.fn(pool.arg);
            atomic_fetch_sub_explicit(&pool.state, 1, memory_order_release);
        }
    }
    return NULL;
}

/* Start nth-1 workers (once; later calls return the running count). */
int ms_init(int nth, int spin) {
    if (pool.nth > 1 || nth <= 1) return pool.nth;
    if (nth > MS_MAX_THREADS) nth = MS_MAX_THREADS;
    pool.spin = spin;
    for (int i = 1; i < nth; i++)
        if (pthread_create(&pool.th[i], NULL, worker, (void *)(intptr_t)i) != 0) { nth = i; break; }
    pool.nth = nth;
    return nth;
}

/* Keep the workers awake (on > 0) or let them sleep again (on = 0 after as many ends as
 * starts): the thread that drives them holds them while it blocks on a disk read, so that
 * the work after the read does not wait for sleeping cores to come back (on this 2-vCPU
 * VM an expert right after a 10-30 ms wait took 1.6-2.1 ms against 1.2 with a core kept
 * busy). Spinning then costs a core that has nothing else to do: the read is the DMA's. */
void ms_hold(int on) {
    if (pool.nth <= 1) return;
    if (on) {
        atomic_fetch_add(&pool.hold, 1);
        futex_wake(&pool.gen); /* sleeping ones: spin again */
    } else {
        atomic_fetch_sub(&pool.hold, 1);
    }
}

static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;

/* One job at a time on the pool (callers on several threads, e.g. cuda's CPU experts,
 * take turns); a job too small to share runs on the caller alone, outside the lock. */
static void run(job_fn fn, void *arg, int share) {
    if (!share || pool.nth <= 1) { fn(arg); return; }
    pthread_mutex_lock(&run_lock);
    pool.fn = fn;
    pool.arg = arg;
    atomic_store_explicit(&pool.state, OPEN, memory_order_release);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    futex_wake(&pool.gen);
    fn(arg);
    atomic_fetch_and_explicit(&pool.state, ~OPEN, memory_order_acq_rel); /* no one joins from now */
    while (atomic_load_explicit(&pool.state, memory_order_acquire)) cpu_relax();
    pthread_mutex_unlock(&run_lock);
}

/* Chunks of rows, a multiple of 4, about 64 KiB of weights each (at least 4 rows). */
static long chunk_rows(long row_bytes) {
    long r = (65536 / (row_bytes > 0 ? row_bytes : 1)) & ~3L;
    return r < 4 ? 4 : r;
}

/* The rows [0, N) of one matrix, cut into chunks and dealt into one contiguous part per
 * thread of the pool. A participant takes chunks from the front of its own part, so its
 * streams through the weights (one, or two for one or two tokens: ``row_block_r``) stay
 * contiguous (the hardware prefetcher follows them: cut
 * into interleaved chunks instead, decoding lost 15-25%), then takes chunks from the back
 * of the others' parts. Each part is one word: first chunk (high half), end (low half). */
typedef struct {
    _Atomic uint64_t part[MS_MAX_THREADS];
    int nparts;
    long N, step;
} rowset;

static void rowset_init(rowset *r, long N, long step, int nparts) {
    long chunks = (N + step - 1) / step;
    r->nparts = nparts;
    r->N = N;
    r->step = step;
    for (int p = 0; p < nparts; p++) {
        uint64_t lo = (uint64_t)(chunks * p / nparts), hi = (uint64_t)(chunks * (p + 1) / nparts);
        atomic_store_explicit(&r->part[p], (lo << 32) | hi, memory_order_relaxed);
    }
}

/* Take one chunk of part p, from its front or its back: its index, or -1 when empty. */
static long take(_Atomic uint64_t *part, int back) {
    uint64_t s = atomic_load_explicit(part, memory_order_relaxed);
    for (;;) {
        uint64_t lo = s >> 32, hi = s & 0xffffffffu;
        if (lo >= hi) return -1;
        uint64_t next = back ? (lo << 32) | (hi - 1) : ((lo + 1) << 32) | hi;
        if (atomic_compare_exchange_weak_explicit(part, &s, next, memory_order_acq_rel, memory_order_relaxed))
            return back ? (long)(hi - 1) : (long)lo;
    }
}

/* The next rows [a, b) for the participant whose own part is ``home``: 0 when none is left. */
static int next_rows(rowset *r, int home, long *a, long *b) {
    long c = take(&r->part[home], 0);
    for (int d = 1; c < 0 && d < r->nparts; d++) c = take(&r->part[(home + d) % r->nparts], 1);
    if (c < 0) return 0;
    *a = c * r->step;
    *b = *a + r->step < r->N ? *a + r->step : r->N;
    return 1;
}

static inline long elem_bytes(int wt) { return wt == W_F32 ? 4 : 2; }

/* ------------------------------------------------------------------------------------ */
/* y[T, N] = x[T, K] W[N, K]^T (+ bias)                                                   */

/* rows n0..n1 of y[T, N] += bias (none: nothing) */
static void add_bias(const float *bias, float *y, long T, long N, long n0, long n1) {
    if (bias)
        for (long t = 0; t < T; t++)
            for (long n = n0; n < n1; n++) y[t * N + n] += bias[n];
}

typedef struct {
    const float *x; const void *w; const float *bias; float *y;
    long T, N, K; int wt;
    _Atomic int homes;
    rowset rows;
} linear_args;

static void linear_job(void *p) {
    linear_args *a = p;
    int home = atomic_fetch_add_explicit(&a->homes, 1, memory_order_relaxed) % a->rows.nparts;
    long n0, n1;
    while (next_rows(&a->rows, home, &n0, &n1)) {
        rows(a->x, a->K, a->w, a->wt, a->K, a->y, a->N, a->T, n0, n1);
        add_bias(a->bias, a->y, a->T, a->N, n0, n1);
    }
}

/* parallel only when there is enough weight to share (a few hundred KB) */
static int worth_sharing(long bytes) { return bytes >= (1L << 18); }

void ms_linear(const float *x, const void *w, int wt, const float *bias, float *y, long T, long N, long K) {
    int share = worth_sharing(N * K * elem_bytes(wt));
    linear_args a = {.x = x, .w = w, .bias = bias, .y = y, .T = T, .N = N, .K = K, .wt = wt, .homes = 0};
    rowset_init(&a.rows, N, chunk_rows(K * elem_bytes(wt)), share ? pool.nth : 1);
    run(linear_job, &a, share);
}

/* ------------------------------------------------------------------------------------ */
/* y[T, N] = x[T, K] W[N, K]^T (+ bias) for W in MXFP4 (gpt-oss's experts as published):   */
/* each row is K/32 blocks of 16 bytes, two e2m1 codes a byte (the even element in the low */
/* nibble), and one e8m0 scale a block (2^(s - 127)). A code's value times its scale is    */
/* exact in fp32, so this is the product with the dequantized weights, read at 4.25 bits a */
/* weight. Per (row, token) two partial sums (a block's halves), summed at the end: the    */
/* order is fixed by k alone, batch invariant like the rest.                               */

static const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* 2^(s - 127) from its bits (a libm ldexpf per block cost more than the block's FMAs) */
static inline float e8m0(uint8_t s) {
    uint32_t u = s ? (uint32_t)s << 23 : 0x00400000u; /* s = 0: 2^-127, a subnormal */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if MS_AVX512
/* Two 16-wide weight vectors into two sums per token (TB tokens, rows ldx apart), and the */
/* sums' totals out: the inner step of the table-lookup kernels (MXFP4, fp32 4-bit).        */
static inline void fma_pair(__m512 (*acc)[2], int TB, __m512 w0, __m512 w1, const float *x, long ldx) {
    for (int t = 0; t < TB; t++) {
        acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * ldx), acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * ldx + 16), acc[t][1]);
    }
}

static inline void store_pairs(__m512 (*acc)[2], int TB, float *y, long ldy) {
    for (int t = 0; t < TB; t++) y[t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}
#endif

#if MS_AVX2
/* AVX2: a block's 16 bytes into its 32 codes in order (low nibble first), looked up eight at
 * a time, times the block's scale (exact), into two sums a (row, token) by chunk of 8. */
static inline __attribute__((always_inline)) void mxfp4_block(const float *x, long ldx, const uint8_t *b,
                                                                const uint8_t *s, long G, float *y, long ldy, int TB) {
    const __m256 lo = _mm256_loadu_ps(FP4), hi = _mm256_loadu_ps(FP4 + 8);
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc[MS_T][2];
    for (int t = 0; t < MS_T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m128i q = _mm_loadu_si128((const __m128i *)(b + g * 16));
        __m128i l = _mm_and_si128(q, low), h = _mm_and_si128(_mm_srli_epi16(q, 4), low);
        __m128i c0 = _mm_unpacklo_epi8(l, h), c1 = _mm_unpackhi_epi8(l, h); /* codes 0-15, 16-31 */
        __m256 sc = _mm256_set1_ps(e8m0(s[g]));
        __m256 w[4] = {_mm256_mul_ps(lut16(lo, hi, _mm256_cvtepu8_epi32(c0)), sc),
                       _mm256_mul_ps(lut16(lo, hi, _mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8))), sc),
                       _mm256_mul_ps(lut16(lo, hi, _mm256_cvtepu8_epi32(c1)), sc),
                       _mm256_mul_ps(lut16(lo, hi, _mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8))), sc)};
        fma_group8(acc, TB, w, x + g * 32, ldx);
    }
    for (int t = 0; t < TB; t++) y[t * ldy] = hsum8(_mm256_add_ps(acc[t][0], acc[t][1]));
}
#endif

static void rows_mxfp4(const float *x, long ldx, const uint8_t *blocks, const uint8_t *scales, long K, float *y,
                       long ldy, long T, long n0, long n1) {
    long G = K / 32;
#if MS_AVX2
    for (long n = n0; n < n1; n++)
        for (long t0 = 0; t0 < T; t0 += MS_T) {
            const uint8_t *b = blocks + n * G * 16, *s = scales + n * G;
            const float *xt = x + t0 * ldx;
            float *yt = y + t0 * ldy + n;
            /* constant trip counts keep acc in registers */
#define MS_CALL(tb) mxfp4_block(xt, ldx, b, s, G, yt, ldy, tb)
            MS_BY_BLOCK(T - t0, MS_CALL)
#undef MS_CALL
        }
#else
#if MS_AVX512
    const __m512 lut = _mm512_loadu_ps(FP4);
    const __m128i low = _mm_set1_epi8(0x0F);
#endif
    for (long n = n0; n < n1; n++) {
        const uint8_t *b = blocks + n * G * 16, *s = scales + n * G;
        for (long t0 = 0; t0 < T; t0 += MS_T) {
            int TB = T - t0 < MS_T ? (int)(T - t0) : MS_T;
#if MS_AVX512
            __m512 acc[MS_T][2];
            for (int t = 0; t < MS_T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
            for (long g = 0; g < G; g++) {
                __m128i q = _mm_loadu_si128((const __m128i *)(b + g * 16));
                __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                __m512 sc = _mm512_set1_ps(e8m0(s[g]));
                __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), lut), sc);
                __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), lut), sc);
                fma_pair(acc, TB, w0, w1, x + t0 * ldx + g * 32, ldx);
            }
            store_pairs(acc, TB, y + t0 * ldy + n, ldy);
#else
            for (int t = 0; t < TB; t++) {
                const float *xt = x + (t0 + t) * ldx;
                float p[16] = {0};
                for (long g = 0; g < G; g++) {
                    float sc = e8m0(s[g]);
                    for (int j = 0; j < 16; j++) {
                        uint8_t q = b[g * 16 + j];
                        p[(2 * j) & 15] += FP4[q & 15] * sc * xt[g * 32 + 2 * j];
                        p[(2 * j + 1) & 15] += FP4[q >> 4] * sc * xt[g * 32 + 2 * j + 1];
                    }
                }
                for (int h = 8; h; h >>= 1)
                    for (int i = 0; i < h; i++) p[i] += p[i + h];
                y[(t0 + t) * ldy + n] = p[0];
            }
#endif
        }
    }
#endif
}

typedef struct {
    const float *x; const uint8_t *blocks, *scales; const float *bias; float *y;
    long T, N, K;
    _Atomic int homes;
    rowset rows;
} mxfp4_args;

static void mxfp4_job(void *p) {
    mxfp4_args *a = p;
    int home = atomic_fetch_add_explicit(&a->homes, 1, memory_order_relaxed) % a->rows.nparts;
    long n0, n1;
    while (next_rows(&a->rows, home, &n0, &n1)) {
        rows_mxfp4(a->x, a->K, a->blocks, a->scales, a->K, a->y, a->N, a->T, n0, n1);
        add_bias(a->bias, a->y, a->T, a->N, n0, n1);
    }
}

void ms_linear_mxfp4(const float *x, const uint8_t *blocks, const uint8_t *scales, const float *bias, float *y, long T,
                     long N, long K) {
    long row_bytes = K / 2 + K / 32;
    int share = worth_sharing(N * row_bytes);
    mxfp4_args a = {.x = x, .blocks = blocks, .scales = scales, .bias = bias, .y = y, .T = T, .N = N, .K = K, .homes = 0};
    rowset_init(&a.rows, N, chunk_rows(row_bytes), share ? pool.nth : 1);
    run(mxfp4_job, &a, share);
}

/* ------------------------------------------------------------------------------------ */
/* y[T, N] = x[T, K] W^T, W in bitsandbytes' 4-bit layout (NF4 / FP4, the draft's): the    */
/* row-major weights' codes two a byte, element 2j in the high nibble and 2j+1 in the low  */
/* one, a 16-entry table of values and an fp32 absmax per `bs` consecutive weights (bs a   */
/* multiple of 32 dividing K). Each weight is table[code] * absmax in fp32, as bitsandbytes */
/* dequantizes it before any rounding to bf16, so 0.5 + 4 / bs bytes a weight of memory    */
/* traffic. Per 16 bytes (32 weights): one widening of the bytes to 32-bit lanes, a shift  */
/* and a mask for the two nibbles, two table lookups in one register; instead of           */
/* interleaving the even (high) and odd (low) weights back, the activations are split into */
/* even and odd halves once per call (`xs`), so the FMAs take the weights as they come.    */
/* With more than MS_T tokens a row is dequantized once into an L1/L2 buffer and the       */
/* blocks of tokens read it back: the same products and sums in the same order, so a row's */
/* result does not depend on the batch.                                                     */

#if MS_AVX512
static inline void nf4_weights(const uint8_t *b, __m512 lut, __m512 sc, __m512 *even, __m512 *odd) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
    *even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), sc);
    *odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), lut), sc);
}
#endif

#if MS_BF16DOT
/* With AVX-512 BF16 (the draft is a draft: verification keeps the output exact) each       */
/* block's 16 values times its absmax are rounded to bf16 once (what bitsandbytes'         */
/* dequantize to bf16 gives), looked up 32 at a time (vpermw) in the code order the        */
/* activations have (bf16, rounded once per call), and multiplied in pairs into fp32 sums   */
/* (vdpbf16ps): half the instructions of fp32 FMAs, two sums a token for the latency.      */
static inline __attribute__((always_inline)) __m512bh nf4_bf16_weights(const uint8_t *b, __m512i tab) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
    __m512i idx = _mm512_or_si512(_mm512_srli_epi32(v, 4), _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), 16));
    return (__m512bh)_mm512_permutexvar_epi16(idx, tab);
}

/* one row against TB (a constant after inlining: the sums stay in registers) tokens */
static inline __attribute__((always_inline)) void nf4_bf16_row(const uint16_t *xb, const uint8_t *b, const float *s,
                                                                __m512 lut, long K, long bs, float *y, long ldy,
                                                                const int TB) {
    __m512 a0[MS_T], a1[MS_T]; /* even and odd groups of 32: two chains for the latency */
    for (int t = 0; t < TB; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    for (long c = 0, g = 0; c < K / bs; c++) {
        __m512i tab = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(lut, _mm512_set1_ps(s[c]))));
        for (long e = 0; e < bs / 32; e += 2, g += 2) {
            __m512bh w0 = nf4_bf16_weights(b + g * 16, tab), w1 = nf4_bf16_weights(b + g * 16 + 16, tab);
            for (int t = 0; t < TB; t++) {
                a0[t] = _mm512_dpbf16_ps(a0[t], w0, (__m512bh)_mm512_loadu_si512(xb + t * K + g * 32));
                a1[t] = _mm512_dpbf16_ps(a1[t], w1, (__m512bh)_mm512_loadu_si512(xb + t * K + g * 32 + 32));
            }
        }
    }
    for (int t = 0; t < TB; t++) y[t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
}

static void rows_nf4_bf16(const uint16_t *xb, const uint8_t *codes, const float *absmax, const float *table, long K,
                          long bs, float *y, long ldy, long T, long n0, long n1) {
    const __m512 lut = _mm512_loadu_ps(table);
    for (long n = n0; n < n1; n++) {
        const uint8_t *b = codes + n * (K / 2);
        const float *s = absmax + n * (K / bs);
        for (long t0 = 0; t0 < T; t0 += MS_T) {
            const uint16_t *xt = xb + t0 * K;
            float *yt = y + t0 * ldy + n;
#define MS_CALL(tb) nf4_bf16_row(xt, b, s, lut, K, bs, yt, ldy, tb)
            MS_BY_BLOCK(T - t0, MS_CALL)
#undef MS_CALL
        }
    }
}
#endif

#if MS_AVX2
/* AVX2: a group's 16 bytes as four vectors of eight weights in the activations' split
 * order (even 0-7 at +0, even 8-15 at +8, odd 0-7 at +16, odd 8-15 at +24), each
 * table[code] * absmax in fp32 */
static inline void nf4_w32(const uint8_t *b, __m256 lo, __m256 hi, __m256 sc, __m256 *w) {
    for (int half = 0; half < 2; half++) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8 * half)));
        w[half] = _mm256_mul_ps(lut16(lo, hi, _mm256_srli_epi32(v, 4)), sc);
        w[2 + half] = _mm256_mul_ps(lut16(lo, hi, _mm256_and_si256(v, _mm256_set1_epi32(15))), sc);
    }
}

/* one row against TB tokens: dequantized as it streams (buf NULL), or read back from buf */
static inline __attribute__((always_inline)) void nf4_row8(const float *xs, long K, const uint8_t *b, const float *s,
                                                             long per_scale, __m256 lo, __m256 hi, const float *buf,
                                                             float *y, long ldy, int TB) {
    __m256 acc[MS_T][2];
    for (int t = 0; t < MS_T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (long g = 0; g < K / 32; g++) {
        __m256 w[4];
        if (buf)
            for (int c = 0; c < 4; c++) w[c] = _mm256_loadu_ps(buf + g * 32 + 8 * c);
        else
            nf4_w32(b + g * 16, lo, hi, _mm256_set1_ps(s[g / per_scale]), w);
        fma_group8(acc, TB, w, xs + g * 32, K);
    }
    for (int t = 0; t < TB; t++) y[t * ldy] = hsum8(_mm256_add_ps(acc[t][0], acc[t][1]));
}

static void rows_nf4_avx2(const float *xs, const uint8_t *codes, const float *absmax, const float *table, long K,
                          long bs, float *y, long ldy, long T, long n0, long n1, float *buf) {
    const __m256 lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
    long per_row = K / bs, per_scale = bs / 32;
    for (long n = n0; n < n1; n++) {
        const uint8_t *b = codes + n * (K / 2);
        const float *s = absmax + n * per_row;
        const float *src = NULL;
        if (T > MS_T) { /* more tokens: the row dequantized once, the same weights read back */
            for (long g = 0; g < K / 32; g++) {
                __m256 w[4];
                nf4_w32(b + g * 16, lo, hi, _mm256_set1_ps(s[g / per_scale]), w);
                for (int c = 0; c < 4; c++) _mm256_storeu_ps(buf + g * 32 + 8 * c, w[c]);
            }
            src = buf;
        }
        for (long t0 = 0; t0 < T; t0 += MS_T) {
            const float *xt = xs + t0 * K;
            float *yt = y + t0 * ldy + n;
#define MS_CALL(tb) nf4_row8(xt, K, b, s, per_scale, lo, hi, src, yt, ldy, tb)
            MS_BY_BLOCK(T - t0, MS_CALL)
#undef MS_CALL
        }
    }
}
#endif

static void rows_nf4(const float *xs, const uint8_t *codes, const float *absmax, const float *table, long K, long bs,
                     float *y, long ldy, long T, long n0, long n1, float *buf) {
#if MS_AVX2
    rows_nf4_avx2(xs, codes, absmax, table, K, bs, y, ldy, T, n0, n1, buf);
#else
    long G = K / 32, per_row = K / bs, per_scale = bs / 32;
#if MS_AVX512
    const __m512 lut = _mm512_loadu_ps(table);
#endif
    for (long n = n0; n < n1; n++) {
        const uint8_t *b = codes + n * (K / 2);
        const float *s = absmax + n * per_row;
#if MS_AVX512
        if (T <= MS_T) { /* decoding: dequantize and multiply in one pass over the row */
            __m512 acc[MS_T][2];
            for (int t = 0; t < MS_T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
            for (long c = 0, g = 0; c < per_row; c++) {
                __m512 sc = _mm512_set1_ps(s[c]);
                for (long e = 0; e < per_scale; e++, g++) {
                    __m512 we, wo;
                    nf4_weights(b + g * 16, lut, sc, &we, &wo);
                    fma_pair(acc, (int)T, we, wo, xs + g * 32, K);
                }
            }
            store_pairs(acc, (int)T, y + n, ldy);
            continue;
        }
        for (long c = 0, g = 0; c < per_row; c++) { /* more tokens: the row dequantized once */
            __m512 sc = _mm512_set1_ps(s[c]);
            for (long e = 0; e < per_scale; e++, g++) {
                __m512 we, wo;
                nf4_weights(b + g * 16, lut, sc, &we, &wo);
                _mm512_storeu_ps(buf + g * 32, we);
                _mm512_storeu_ps(buf + g * 32 + 16, wo);
            }
        }
        for (long t0 = 0; t0 < T; t0 += MS_T) {
            int TB = T - t0 < MS_T ? (int)(T - t0) : MS_T;
            __m512 acc[MS_T][2];
            for (int t = 0; t < MS_T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
            for (long g = 0; g < G; g++) {
                fma_pair(acc, TB, _mm512_loadu_ps(buf + g * 32), _mm512_loadu_ps(buf + g * 32 + 16), xs + t0 * K + g * 32, K);
            }
            store_pairs(acc, TB, y + t0 * ldy + n, ldy);
        }
#else
        (void)buf;
        for (long t = 0; t < T; t++) {
            const float *xt = xs + t * K;
            float p[16] = {0};
            for (long g = 0; g < G; g++) {
                float sc = s[g / per_scale];
                for (int j = 0; j < 16; j++) {
                    uint8_t q = b[g * 16 + j];
                    p[j] += table[q >> 4] * sc * xt[g * 32 + j];
                    p[j] += table[q & 15] * sc * xt[g * 32 + 16 + j];
                }
            }
            for (int h = 8; h; h >>= 1)
                for (int i = 0; i < h; i++) p[i] += p[i + h];
            y[t * ldy + n] = p[0];
        }
#endif
    }
#endif
}

typedef struct {
    const float *xs; const uint16_t *xb; const uint8_t *codes; const float *absmax, *table, *bias; float *y;
    long T, N, K, bs;
    _Atomic int homes;
    rowset rows;
} nf4_args;

static void nf4_job(void *p) {
    nf4_args *a = p;
    int home = atomic_fetch_add_explicit(&a->homes, 1, memory_order_relaxed) % a->rows.nparts;
    float *buf = !MS_BF16DOT && a->T > MS_T ? malloc(a->K * sizeof(float)) : NULL; /* a row, dequantized */
    long n0, n1;
    while (next_rows(&a->rows, home, &n0, &n1)) {
#if MS_BF16DOT
        (void)buf;
        rows_nf4_bf16(a->xb, a->codes, a->absmax, a->table, a->K, a->bs, a->y, a->N, a->T, n0, n1);
#else
        rows_nf4(a->xs, a->codes, a->absmax, a->table, a->K, a->bs, a->y, a->N, a->T, n0, n1, buf);
#endif
        add_bias(a->bias, a->y, a->T, a->N, n0, n1);
    }
    free(buf);
}

void ms_linear_nf4(const float *x, const uint8_t *codes, const float *absmax, const float *table, long bs,
                   const float *bias, float *y, long T, long N, long K) {
    float *xs = NULL;
    uint16_t *xb = NULL;
#if MS_BF16DOT
    xb = malloc(T * K * sizeof(uint16_t)); /* the activations in bf16, rounded to nearest even */
    for (long i = 0; i < T * K; i += 16)
        _mm256_storeu_si256((__m256i *)(xb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
#else
    xs = malloc(T * K * sizeof(float)); /* each 32 activations as 16 even, then 16 odd */
    for (long t = 0; t < T; t++)
        for (long g = 0; g < K; g += 32)
            for (int j = 0; j < 16; j++) {
                xs[t * K + g + j] = x[t * K + g + 2 * j];
                xs[t * K + g + 16 + j] = x[t * K + g + 2 * j + 1];
            }
#endif
    long row_bytes = K / 2 + 4 * (K / bs);
    int share = worth_sharing(N * row_bytes);
    nf4_args a = {.xs = xs, .xb = xb, .codes = codes, .absmax = absmax, .table = table, .bias = bias, .y = y,
                  .T = T, .N = N, .K = K, .bs = bs, .homes = 0};
    rowset_init(&a.rows, N, chunk_rows(row_bytes), share ? pool.nth : 1);
    run(nf4_job, &a, share);
    free(xs);
    free(xb);
}

/* ------------------------------------------------------------------------------------ */
/* out[i] = table[code i] * absmax[i / bs] for the n weights of bitsandbytes' 4-bit layout  */
/* (two codes a byte, element 2j in the high nibble), rounded once to fp32 (ot 0) or bf16   */
/* (ot 1, nearest even): what ``moespeq::dequantize_4bit`` gives, many experts end to end   */
/* (the grouped draft's weights on the mock and the CPU; torch's gather and casts took     */
/* ~30x the memory traffic). Each block's 16 values are scaled, and rounded, once; then two */
/* lookups a byte. The last block may be partial (n need not be a multiple of bs).          */

static inline uint16_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if (v != v) return 0x7fc0; /* NaN, as torch rounds it */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

typedef struct {
    const uint8_t *codes; const float *absmax, *table; void *out;
    long n, bs; int ot;
    _Atomic int homes;
    rowset blocks;
} dequant_args;

static void dequant_blocks(const dequant_args *a, long b0, long b1) {
    for (long b = b0; b < b1; b++) {
        long i0 = b * a->bs, i1 = i0 + a->bs < a->n ? i0 + a->bs : a->n;
        const uint8_t *c = a->codes + i0 / 2;
        float s = a->absmax[b], f[16];
        for (int k = 0; k < 16; k++) f[k] = a->table[k] * s;
        long nbytes = (i1 - i0) / 2, j = 0;
        if (a->ot == 1) {
            uint16_t h[32] = {0}, *o = (uint16_t *)a->out + i0;
            for (int k = 0; k < 16; k++) h[k] = bf16_bits(f[k]);
#if MS_AVX512
            /* 16 bytes -> 32 bf16: each 32-bit lane's low word the high nibble's value */
            __m512i tab = _mm512_loadu_si512(h), lo4 = _mm512_set1_epi32(15);
            for (; j + 16 <= nbytes; j += 16) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
                __m512i idx = _mm512_or_si512(_mm512_srli_epi32(v, 4), _mm512_slli_epi32(_mm512_and_si512(v, lo4), 16));
                _mm512_storeu_si512(o + 2 * j, _mm512_permutexvar_epi16(idx, tab));
            }
#endif
            for (; j < nbytes; j++) {
                o[2 * j] = h[c[j] >> 4];
                o[2 * j + 1] = h[c[j] & 15];
            }
        } else {
            float *o = (float *)a->out + i0;
#if MS_AVX512
            __m512 lut = _mm512_loadu_ps(f);
            __m512i lo4 = _mm512_set1_epi32(15);
            __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
            for (; j + 16 <= nbytes; j += 16) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
                __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
                __m512 odd = _mm512_permutexvar_ps(_mm512_and_si512(v, lo4), lut);
                _mm512_storeu_ps(o + 2 * j, _mm512_permutex2var_ps(even, first, odd));
                _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutex2var_ps(even, second, odd));
            }
#endif
            for (; j < nbytes; j++) {
                o[2 * j] = f[c[j] >> 4];
                o[2 * j + 1] = f[c[j] & 15];
            }
        }
    }
}

static void dequant_job(void *p) {
    dequant_args *a = p;
    int home = atomic_fetch_add_explicit(&a->homes, 1, memory_order_relaxed) % a->blocks.nparts;
    long b0, b1;
    while (next_rows(&a->blocks, home, &b0, &b1)) dequant_blocks(a, b0, b1);
}

/* n even, bs even; out holds n values of ot's type */
void ms_dequant_4bit(const uint8_t *codes, const float *absmax, const float *table, long n, long bs, void *out, int ot) {
    long nb = (n + bs - 1) / bs;
    int share = worth_sharing(n * (ot == 1 ? 2 : 4));
    dequant_args a = {.codes = codes, .absmax = absmax, .table = table, .out = out, .n = n, .bs = bs, .ot = ot, .homes = 0};
    rowset_init(&a.blocks, nb, chunk_rows(bs * (ot == 1 ? 2 : 4)), share ? pool.nth : 1);
    run(dequant_job, &a, share);
}
/* ------------------------------------------------------------------------------------ */
/* A gated expert: y[T, H] = down(act(gate x) * up x), act SiLU, GELU (tanh) or GELU (erf);*/
/* gate, up [I, H]; down [H, I];                                                          */
/* h is scratch [T, I]. Two phases, each cut into chunks; the second starts once every    */
/* chunk of the first is done (a participant that runs out of first-phase chunks waits    */
/* for those still being computed, by threads that are running).                          */

typedef struct {
    const float *x; const void *gate, *up, *down; float *h, *g, *y;
    long T, H, I; int wt, act;
    _Atomic int homes;
    _Atomic long done1;
    rowset rows1, rows2;
} expert_args;

enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2 };

static inline float gate_act(float v, int act) {
    if (act == ACT_GELU_TANH) return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    if (act == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
    return v / (1.0f + expf(-v));
}

static void expert_job(void *p) {
    expert_args *a = p;
    int home = atomic_fetch_add_explicit(&a->homes, 1, memory_order_relaxed) % a->rows1.nparts;
    long n0, n1;
    while (next_rows(&a->rows1, home, &n0, &n1)) {
        rows2(a->x, a->H, a->gate, a->up, a->wt, a->H, a->g, a->h, a->I, a->T, n0, n1);
        for (long t = 0; t < a->T; t++)
            for (long n = n0; n < n1; n++) a->h[t * a->I + n] *= gate_act(a->g[t * a->I + n], a->act);
        atomic_fetch_add_explicit(&a->done1, n1 - n0, memory_order_release);
    }
    while (atomic_load_explicit(&a->done1, memory_order_acquire) < a->I) cpu_relax(); /* every part of h */
    while (next_rows(&a->rows2, home, &n0, &n1)) rows(a->h, a->I, a->down, a->wt, a->I, a->y, a->H, a->T, n0, n1);
}

/* scratch: 2 * T * I floats */
void ms_expert(const float *x, const void *gate, const void *up, const void *down, int wt, float *scratch, float *y,
               long T, long H, long I, int act) {
    long e = elem_bytes(wt);
    int share = worth_sharing(3 * H * I * e), parts = share ? pool.nth : 1;
    expert_args a = {.x = x, .gate = gate, .up = up, .down = down, .h = scratch, .g = scratch + T * I, .y = y,
                     .T = T, .H = H, .I = I, .wt = wt, .act = act, .homes = 0, .done1 = 0};
    rowset_init(&a.rows1, I, chunk_rows(2 * H * e), parts);
    rowset_init(&a.rows2, H, chunk_rows(I * e), parts);
    run(expert_job, &a, share);
}

/* ------------------------------------------------------------------------------------ */
/* A layer's routed experts in one call: y[T, H] = sum over each token's k choices of     */
/* w[t, j] * expert ids[t, j] (x[t]), every expert a gated one of ``ms_expert`` (pointers */
/* per expert id). executors/experts.py ``grouped``, bit for bit: each expert used is run */
/* once, ascending by id, on its tokens' rows in ascending order (a row's result does not */
/* depend on the others: batch invariance), each product with the weight rounded to fp32, */
/* then added to the token's row of a zeroed y, experts ascending. One call where Python  */
/* made a dozen torch ops and k kernel calls a layer.                                     */
/* scratch: 2 * T * I + 2 * T * H floats. Returns 0, or -1 without computing anything    */
/* when an id is not in [0, E) or a token chose an expert twice (the caller's path then   */
/* decides what that means), -2 when out of memory.                                      */

typedef struct {
    int64_t e;
    long t;
    float w;
} moe_choice;

static int by_expert_then_token(const void *a, const void *b) {
    const moe_choice *p = a, *q = b;
    if (p->e != q->e) return p->e < q->e ? -1 : 1;
    return (p->t > q->t) - (p->t < q->t);
}

int ms_moe(const float *x, long T, long H, long I, long k, long E, const int64_t *ids, const float *w,
           const void *const *gate, const void *const *up, const void *const *down, int wt, int act,
           float *scratch, float *y) {
    float *xg = scratch + 2 * T * I, *yg = xg + T * H;
    long n_used = T * k;
    if (T < 1 || T > MAX_MOE_ROWS || k < 1) return -1;
    for (long i = 0; i < n_used; i++)
        if (ids[i] < 0 || ids[i] >= E) return -1;
    moe_choice *c = malloc(n_used * sizeof *c);
    if (!c) return -2;
    for (long i = 0; i < n_used; i++) c[i] = (moe_choice){.e = ids[i], .t = i / k, .w = w[i]};
    qsort(c, n_used, sizeof *c, by_expert_then_token); /* experts ascending, their tokens ascending */
    for (long i = 1; i < n_used; i++)
        if (c[i].e == c[i - 1].e && c[i].t == c[i - 1].t) { /* then an expert's rows could exceed T */
            free(c);
            return -1;
        }
    for (long i = 0; i < T * H; i++) y[i] = 0.0f;
    for (long i0 = 0, i1; i0 < n_used; i0 = i1) {
        int64_t e = c[i0].e;
        for (i1 = i0; i1 < n_used && c[i1].e == e; i1++) {}
        long n = i1 - i0;
        float wn[MAX_MOE_ROWS];
        long tn[MAX_MOE_ROWS]; /* n <= T <= MAX_MOE_ROWS: each token chose the expert at most once */
        for (long r = 0; r < n; r++) {
            tn[r] = c[i0 + r].t;
            wn[r] = c[i0 + r].w;
        }
        const float *xe = x; /* every token, in order (n == T: no token twice) */
        if (n != T) {
            for (long r = 0; r < n; r++)
                for (long h = 0; h < H; h++) xg[r * H + h] = x[tn[r] * H + h];
            xe = xg;
        }
        ms_expert(xe, gate[e], up[e], down[e], wt, scratch, yg, n, H, I, act);
        for (long r = 0; r < n; r++) {
            float *yt = y + tn[r] * H;
            const float *ye = yg + r * H, wr = wn[r];
            for (long h = 0; h < H; h++) {
                float p = ye[h] * wr;
                yt[h] = yt[h] + p;
            }
        }
    }
    free(c);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* y[T, N] = x[T, K] W[N, K]^T for W in block FP8 (DeepSeek-V3's layout): e4m3 bytes and   */
/* one fp32 scale per bm x bn block. Each weight is widened exactly (its byte as an fp16,  */
/* then times 2^8: the same value), times its block's scale in fp32 (the one rounding      */
/* dequantizing it makes), then FMA'd: the product with the dequantized weights, at a byte */
/* a weight. Four partial sums per (row, token) by k/16 mod 4, as row_block: batch         */
/* invariant. The AVX-512 path needs bn a multiple of 16 (128 in every release).           */

static inline float e4m3_widen(uint8_t b) {
    uint32_t s = (uint32_t)(b & 0x80) << 24, e = (b >> 3) & 15, m = b & 7;
    float v = e ? ldexpf(1.0f + m / 8.0f, (int)e - 7) : ldexpf(m / 8.0f, -6);
    return s ? -v : v;
}

#if MS_AVX2
/* AVX2 (bn a multiple of 16): eight bytes at a time widened as above, times the block's
 * scale, two sums a (row, token) by chunk of 8; a row's last chunk may be partial. */
static inline __m256 fp8_w8(const uint8_t *b, long m, __m256 sc) {
    uint8_t tmp[8] = {0};
    if (m < 8) memcpy(tmp, b, (size_t)m);
    __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(m < 8 ? tmp : b)));
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(v, _mm_set1_epi16(0x80)), 8),
                             _mm_slli_epi16(_mm_and_si128(v, _mm_set1_epi16(0x7F)), 7));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), sc);
}

static inline __attribute__((always_inline)) void fp8_row8(const float *x, long ldx, const uint8_t *row,
                                                             const float *srow, long bn, long K, float *y, long ldy,
                                                             int TB) {
    __m256 acc[MS_T][2];
    for (int t = 0; t < MS_T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (long kb = 0; kb < K; kb += bn) {
        __m256 sc = _mm256_set1_ps(256.0f * srow[kb / bn]);
        long kend = kb + bn < K ? kb + bn : K;
        for (long k = kb; k < kend; k += 16) { /* k/8 even: chunks to sums 0, then 1 */
            for (int j = 0; j < 2 && k + 8 * j < kend; j++) {
                long at = k + 8 * j, m = kend - at < 8 ? kend - at : 8;
                __m256 wv = fp8_w8(row + at, m, sc);
                for (int t = 0; t < TB; t++) {
                    __m256 xv = m == 8 ? _mm256_loadu_ps(x + t * ldx + at) : load_part8(x + t * ldx + at, 4, m);
                    acc[t][j] = _mm256_fmadd_ps(wv, xv, acc[t][j]);
                }
            }
        }
    }
    for (int t = 0; t < TB; t++) y[t * ldy] = hsum8(_mm256_add_ps(acc[t][0], acc[t][1]));
}
#endif

static void rows_fp8(const float *x, long ldx, const uint8_t *w, const float *scales, long bm, long bn, long K,
                     float *y, long ldy, long T, long n0, long n1) {
    long ncb = (K + bn - 1) / bn;
#if MS_AVX2
    if (bn % 16 == 0) {
        for (long n = n0; n < n1; n++)
            for (long t0 = 0; t0 < T; t0 += MS_T) {
                const uint8_t *row = w + n * K;
                const float *srow = scales + (n / bm) * ncb, *xt = x + t0 * ldx;
                float *yt = y + t0 * ldy + n;
#define MS_CALL(tb) fp8_row8(xt, ldx, row, srow, bn, K, yt, ldy, tb)
                MS_BY_BLOCK(T - t0, MS_CALL)
#undef MS_CALL
            }
        return;
    }
#endif
    for (long n = n0; n < n1; n++) {
        const uint8_t *row = w + n * K;
        const float *srow = scales + (n / bm) * ncb;
        for (long t0 = 0; t0 < T; t0 += MS_T) {
            int TB = T - t0 < MS_T ? (int)(T - t0) : MS_T;
#if MS_AVX512
            __m512 acc[MS_T][4];
            for (int t = 0; t < MS_T; t++)
                for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_ps();
            const __m256i hi = _mm256_set1_epi16(0x80), lo = _mm256_set1_epi16(0x7F);
            for (long kb = 0; kb < K; kb += bn) { /* one column block: one scale (bn is a multiple of 16) */
                __m512 sc = _mm512_set1_ps(256.0f * srow[kb / bn]);
                long kend = kb + bn < K ? kb + bn : K;
                for (long k = kb; k < kend; k += 16) {
                    __mmask16 m = kend - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (kend - k)) - 1);
                    __m256i b = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, row + k));
                    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, hi), 8),
                                                _mm256_slli_epi16(_mm256_and_si256(b, lo), 7));
                    __m512 wv = _mm512_mul_ps(_mm512_cvtph_ps(h), sc);
                    int j = (int)((k / 16) & 3);
                    for (int t = 0; t < TB; t++)
                        acc[t][j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + (t0 + t) * ldx + k), acc[t][j]);
                }
            }
            for (int t = 0; t < TB; t++)
                y[(t0 + t) * ldy + n] =
                    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
#else
            for (int t = 0; t < TB; t++) {
                const float *xt = x + (t0 + t) * ldx;
                float p[16] = {0};
                for (long k = 0; k < K; k++) p[k & 15] += (e4m3_widen(row[k]) * srow[k / bn]) * xt[k];
                for (int s = 8; s; s >>= 1)
                    for (int i = 0; i < s; i++) p[i] += p[i + s];
                y[(t0 + t) * ldy + n] = p[0];
            }
#endif
        }
    }
}

typedef struct {
    const float *x; const uint8_t *w; const float *scales, *bias; float *y;
    long T, N, K, bm, bn;
    _Atomic int homes;
    rowset rows;
} fp8_args;

static void fp8_job(void *p) {
    fp8_args *a = p;
    int home = atomic_fetch_add_explicit(&a->homes, 1, memory_order_relaxed) % a->rows.nparts;
    long n0, n1;
    while (next_rows(&a->rows, home, &n0, &n1)) {
        rows_fp8(a->x, a->K, a->w, a->scales, a->bm, a->bn, a->K, a->y, a->N, a->T, n0, n1);
        add_bias(a->bias, a->y, a->T, a->N, n0, n1);
    }
}

void ms_linear_fp8(const float *x, const uint8_t *w, const float *scales, long bm, long bn, const float *bias, float *y,
                   long T, long N, long K) {
    int share = worth_sharing(N * K);
    fp8_args a = {.x = x, .w = w, .scales = scales, .bias = bias, .y = y, .T = T, .N = N, .K = K, .bm = bm, .bn = bn,
                  .homes = 0};
    rowset_init(&a.rows, N, chunk_rows(K), share ? pool.nth : 1);
    run(fp8_job, &a, share);
}

/* ------------------------------------------------------------------------------------ */
/* gpt-oss's expert, from its parts as stored: y[T, H] = act(x GU + gu_bias) D + d_bias,   */
/* GU [H, 2I] (column 2j is gate j, 2j+1 up j), D [I, H], biases in the weights' dtype,   */
/* act(g, u) = (clamp(u, +-limit) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit).       */
/* A product with a transposed weight streams W's rows: a chunk of rows [k0, k1) adds      */
/* x[t][k] * W[k][:] into its own partial sums, k in order, and the chunks' sums are then  */
/* added in chunk order. Chunks are fixed by K alone, so y[t][n] is the same sequence of   */
/* operations whatever T, the thread count or who takes which chunk (batch invariant).     */

#define MS_TCHUNKS 16 /* partial sums per product: enough chunks to share, few to add up */
#ifndef MS_TR /* rows per pass over the partial sums (AVX2: 8, measured 0.96-1.16 ms against 1.3 with 4 on a */
#define MS_TR (MS_AVX2 ? 8 : 4) /* 1024 x 3584 bf16 expert; AVX-512 keeps the 4 it was tuned with) */
#endif

static long tchunk_rows(long K) { return (K + MS_TCHUNKS - 1) / MS_TCHUNKS; }

/* part[t][0:N] = sum over k in [k0, k1) of x[t][k] * W[k][0:N], k in order */
static void tchunk(const float *x, long ldx, const void *w, int wt, long N, float *part, long T, long k0, long k1) {
    memset(part, 0, sizeof(float) * T * N);
    long e = elem_bytes(wt);
#if MS_AVX512
    /* MS_TR rows per pass: the partial sums are loaded and stored once per pass, the rows'
     * FMAs applied in k order in between (the same operations as one row at a time) */
    long k = k0;
    for (; k + MS_TR <= k1; k += MS_TR) {
        const char *row = (const char *)w + k * N * e;
        for (long t = 0; t < T; t++) {
            __m512 xb[MS_TR];
            for (int r = 0; r < MS_TR; r++) xb[r] = _mm512_set1_ps(x[t * ldx + k + r]);
            float *p = part + t * N;
            long n = 0;
            for (; n + 16 <= N; n += 16) {
                __m512 acc = _mm512_loadu_ps(p + n);
                for (int r = 0; r < MS_TR; r++) acc = _mm512_fmadd_ps(load_w(row + r * N * e, wt, n, 0xffff), xb[r], acc);
                _mm512_storeu_ps(p + n, acc);
            }
            if (n < N) {
                __mmask16 m = (__mmask16)((1u << (N - n)) - 1);
                __m512 acc = _mm512_maskz_loadu_ps(m, p + n);
                for (int r = 0; r < MS_TR; r++) acc = _mm512_fmadd_ps(load_w(row + r * N * e, wt, n, m), xb[r], acc);
                _mm512_mask_storeu_ps(p + n, m, acc);
            }
        }
    }
    for (; k < k1; k++) {
        const char *row = (const char *)w + k * N * e;
        for (long t = 0; t < T; t++) {
            __m512 xb = _mm512_set1_ps(x[t * ldx + k]);
            float *p = part + t * N;
            long n = 0;
            for (; n + 16 <= N; n += 16)
                _mm512_storeu_ps(p + n, _mm512_fmadd_ps(load_w(row, wt, n, 0xffff), xb, _mm512_loadu_ps(p + n)));
            if (n < N) {
                __mmask16 m = (__mmask16)((1u << (N - n)) - 1);
                _mm512_mask_storeu_ps(p + n, m, _mm512_fmadd_ps(load_w(row, wt, n, m), xb, _mm512_maskz_loadu_ps(m, p + n)));
            }
        }
    }
#elif MS_AVX2
    /* as the AVX-512 path, 8 columns a vector; the last N % 8 by scalar FMAs, the same
     * operation per element (so the same result as every other path) */
    for (long k = k0; k < k1;) {
        int R = k + MS_TR <= k1 ? MS_TR : 1;
        const char *row = (const char *)w + k * N * e;
        for (long t = 0; t < T; t++) {
            float xs[MS_TR], *p = part + t * N;
            __m256 xb[MS_TR];
            for (int r = 0; r < R; r++) xb[r] = _mm256_set1_ps(xs[r] = x[t * ldx + k + r]);
            long n = 0;
            for (; n + 8 <= N; n += 8) {
                __m256 acc = _mm256_loadu_ps(p + n);
                for (int r = 0; r < R; r++) acc = _mm256_fmadd_ps(load_w8(row + r * N * e, wt, n), xb[r], acc);
                _mm256_storeu_ps(p + n, acc);
            }
            for (; n < N; n++)
                for (int r = 0; r < R; r++) p[n] = fmaf(widen_scalar(row + r * N * e, wt, n), xs[r], p[n]);
        }
        k += R;
    }
#else
    for (long k = k0; k < k1; k++) {
        const char *row = (const char *)w + k * N * e;
        for (long t = 0; t < T; t++) {
            float xv = x[t * ldx + k], *p = part + t * N;
            for (long n = 0; n < N; n++) p[n] = fmaf(widen_scalar(row, wt, n), xv, p[n]);
        }
    }
#endif
}

/* the sum of the chunks' partials for columns [n0, n1) of every token, chunk by chunk, plus the bias */
static void tsum(const float *parts, long chunks, long T, long N, const void *bias, int wt, float *out, long n0, long n1) {
    for (long t = 0; t < T; t++)
        for (long n = n0; n < n1; n++) {
            float s = parts[t * N + n];
            for (long c = 1; c < chunks; c++) s += parts[(c * T + t) * N + n];
            out[t * N + n] = s + widen_scalar(bias, wt, n);
        }
}

typedef struct {
    const float *x; const void *gu, *gub, *d, *db; int wt; float alpha, limit;
    float *p1, *gus, *h, *p2, *y;
    long T, H, I, r1, c1, r2, c2;
    _Atomic long next[4], done[4];
} expert_t_args;

#define MS_TCOLS 512 /* columns per claim when summing partials */

static int claim(_Atomic long *next, long total, long *i) {
    *i = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
    return *i < total;
}

static void finish(_Atomic long *done) { atomic_fetch_add_explicit(done, 1, memory_order_release); }

static void wait_for(_Atomic long *done, long total) {
    while (atomic_load_explicit(done, memory_order_acquire) < total) cpu_relax(); /* by running threads */
}

static void expert_t_job(void *p) {
    expert_t_args *a = p;
    long T = a->T, H = a->H, I = a->I, i;
    long b1 = (2 * I + MS_TCOLS - 1) / MS_TCOLS, b2 = (H + MS_TCOLS - 1) / MS_TCOLS;
    while (claim(&a->next[0], a->c1, &i)) { /* x GU, chunk i of H's rows */
        long k0 = i * a->r1, k1 = k0 + a->r1 < H ? k0 + a->r1 : H;
        tchunk(a->x, H, a->gu, a->wt, 2 * I, a->p1 + i * T * 2 * I, T, k0, k1);
        finish(&a->done[0]);
    }
    wait_for(&a->done[0], a->c1);
    while (claim(&a->next[1], b1, &i)) { /* + bias, then the clamped SwiGLU of each (gate, up) pair */
        long n0 = i * MS_TCOLS, n1 = n0 + MS_TCOLS < 2 * I ? n0 + MS_TCOLS : 2 * I;
        tsum(a->p1, a->c1, T, 2 * I, a->gub, a->wt, a->gus, n0, n1);
        for (long t = 0; t < T; t++)
            for (long n = n0 / 2; n < n1 / 2; n++) {
                float g = a->gus[t * 2 * I + 2 * n], u = a->gus[t * 2 * I + 2 * n + 1];
                g = g < a->limit ? g : a->limit;
                u = u < -a->limit ? -a->limit : (u > a->limit ? a->limit : u);
                a->h[t * I + n] = (u + 1.0f) * (g * (1.0f / (1.0f + expf(-(g * a->alpha)))));
            }
        finish(&a->done[1]);
    }
    wait_for(&a->done[1], b1);
    while (claim(&a->next[2], a->c2, &i)) { /* h D, chunk i of I's rows */
        long k0 = i * a->r2, k1 = k0 + a->r2 < I ? k0 + a->r2 : I;
        tchunk(a->h, I, a->d, a->wt, H, a->p2 + i * T * H, T, k0, k1);
        finish(&a->done[2]);
    }
    wait_for(&a->done[2], a->c2);
    while (claim(&a->next[3], b2, &i)) { /* + bias */
        long n0 = i * MS_TCOLS, n1 = n0 + MS_TCOLS < H ? n0 + MS_TCOLS : H;
        tsum(a->p2, a->c2, T, H, a->db, a->wt, a->y, n0, n1);
    }
}

/* scratch: MS_TCHUNKS * T * (2I + H) + 2 * T * I + T * I floats (ms_expert_t_scratch) */
long ms_expert_t_scratch(long T, long H, long I) { return MS_TCHUNKS * T * (2 * I + H) + 3 * T * I; }

void ms_expert_t(const float *x, const void *gu, const void *gub, const void *d, const void *db, int wt, float alpha,
                 float limit, float *scratch, float *y, long T, long H, long I) {
    long e = elem_bytes(wt);
    int share = worth_sharing(3 * H * I * e);
    expert_t_args a = {.x = x, .gu = gu, .gub = gub, .d = d, .db = db, .wt = wt, .alpha = alpha, .limit = limit,
                       .T = T, .H = H, .I = I, .y = y};
    a.r1 = tchunk_rows(H);
    a.c1 = (H + a.r1 - 1) / a.r1;
    a.r2 = tchunk_rows(I);
    a.c2 = (I + a.r2 - 1) / a.r2;
    a.p1 = scratch;
    a.p2 = a.p1 + MS_TCHUNKS * T * 2 * I;
    a.gus = a.p2 + MS_TCHUNKS * T * H;
    a.h = a.gus + 2 * T * I;
    for (int s = 0; s < 4; s++) {
        atomic_init(&a.next[s], 0);
        atomic_init(&a.done[s], 0);
    }
    run(expert_t_job, &a, share);
}

/* ------------------------------------------------------------------------------------ */
/* One product per head with the head's own weight block (MLA's absorbed attention: the   */
/* query times each head's key expansion, attention's latent output times each head's     */
/* value expansion). Head h: x_h = x + h * hx ([T, K], rows ldx apart), W_h = w + h * hw   */
/* elements. Not transposed: y_h[T, N] = x_h W_h[N, K]^T at y + h * hy, rows ldy apart     */
/* (`rows`, as ms_linear). Transposed: y_h[T, N] = x_h W_h[K, N] at y + h * hy, rows N     */
/* apart (one `tchunk` over all of K: W's rows streamed in k order). Heads are dealt one  */
/* at a time; each head's result is the same operations whatever T or the thread count.   */

typedef struct {
    const float *x; const void *w; float *y;
    long hx, ldx, hw, hy, ldy, H, T, N, K; int wt, transposed;
    _Atomic long next;
} heads_args;

static void heads_job(void *p) {
    heads_args *a = p;
    long e = elem_bytes(a->wt), h;
    while (claim(&a->next, a->H, &h)) {
        const float *x = a->x + h * a->hx;
        const void *w = (const char *)a->w + h * a->hw * e;
        if (a->transposed) tchunk(x, a->ldx, w, a->wt, a->N, a->y + h * a->hy, a->T, 0, a->K);
        else rows(x, a->ldx, w, a->wt, a->K, a->y + h * a->hy, a->ldy, a->T, 0, a->N);
    }
}

void ms_heads(const float *x, long hx, long ldx, const void *w, int wt, long hw, int transposed, float *y, long hy,
              long ldy, long H, long T, long N, long K) {
    heads_args a = {.x = x, .w = w, .y = y, .hx = hx, .ldx = ldx, .hw = hw, .hy = hy, .ldy = ldy, .H = H, .T = T,
                    .N = N, .K = K, .wt = wt, .transposed = transposed};
    atomic_init(&a.next, 0);
    run(heads_job, &a, H > 1 && worth_sharing(H * N * K * elem_bytes(wt)));
}

/* ------------------------------------------------------------------------------------ */
/* The small per-token ops of a layer, one call each instead of several torch ops.        */

/* y[r] = w * (x[r] * (1 / sqrt(mean(x[r]^2) + eps))) for R rows of H, as torch's RMSNorm
 * in float32 (same operations and rounding order per element; the mean's sum in a fixed
 * order of its own). */
void ms_rmsnorm(const float *x, const float *w, float eps, float *y, long R, long H) {
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * H;
        float *yr = y + r * H;
        float p[16] = {0};
        for (long i = 0; i < H; i++) p[i & 15] += xr[i] * xr[i];
        for (int s = 8; s; s >>= 1)
            for (int i = 0; i < s; i++) p[i] += p[i + s];
        float inv = 1.0f / sqrtf(p[0] / (float)H + eps);
        for (long i = 0; i < H; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* Half-split rotary embedding (Llama layout), as x * cos + rotate_half(x) * sin in
 * float32: x [heads, T, d] with strides (sh, st) in elements and d contiguous; cos, sin
 * [T, d] contiguous; out [heads, T, d] contiguous. Bit-identical to the torch expression. */
static void rope_to(const float *x, long sh, long st, const float *cos, const float *sin, float *out, long oh, long ot,
                    long heads, long T, long d) {
    long h = d / 2;
    for (long a = 0; a < heads; a++)
        for (long t = 0; t < T; t++) {
            const float *xr = x + a * sh + t * st, *c = cos + t * d, *s = sin + t * d;
            float *o = out + a * oh + t * ot;
            for (long i = 0; i < h; i++) o[i] = xr[i] * c[i] + (-xr[i + h]) * s[i];
            for (long i = h; i < d; i++) o[i] = xr[i] * c[i] + xr[i - h] * s[i];
        }
}

void ms_rope(const float *x, long sh, long st, const float *cos, const float *sin, float *out, long heads, long T,
             long d) {
    rope_to(x, sh, st, cos, sin, out, T * d, d, heads, T, d);
}

/* ------------------------------------------------------------------------------------ */
/* Attention of T new queries over the cache (decoding and verification), one call a     */
/* layer instead of torch's SDPA (about 50 us a call at one query on two cores, most of   */
/* it set-up). Query t sits at position start + t and sees keys l <= start + t (and       */
/* l > start + t - window with a sliding window); query head h reads kv head h / G.       */
/* Each (query, head) is computed in a fixed order -- scores (a dot product in 8 partial  */
/* sums), their maximum, exp and sum in order of l, the values weighted in order of l     */
/* (one running sum an output, kept in memory between pieces of keys), then divided by    */
/* the sum -- so a result does not depend on T: verification over k + 1 tokens gives what */
/* k + 1 single steps give, bit for bit. With ``sinks`` (gpt-oss) each head's softmax has */
/* one more logit, sinks[h], whose share is dropped.                                      */
/* The rows that read one kv head (its G query heads at each of the T positions: all of   */
/* MLA's) go in blocks: a block walks the keys and values in pieces that stay in L2 while */
/* each of its rows uses them, so the cache is read from memory once a block, not once a  */
/* row (MLA at 2048 positions: 20 rows a token each read 9 MB of latents). With SIMD, four */
/* rows of one position go through a piece together (att_scores4, att_values4: each key   */
/* and value loaded once for the four), and where a kv head serves four or more query     */
/* heads the next piece is prefetched into L2 while this one is used.                     */

typedef struct {
    const float *q, *k, *v, *sinks;
    float *out;
    long qh, qt, kh, kl, vh, vl; /* strides (elements): q[h, t], k[g, l], v[g, l] */
    long H, G, T, L, d, dv, start, window;
    long rows, blocks, keys; /* rows a block, blocks a kv head, keys a piece */
    float scale;
    _Atomic long next;
} attend_args;

#if MS_AVX512 || MS_AVX2
/* q . k over d: eight lanes along d in order, summed across, then the last d % 8 in order */
static inline float att_finish(__m256 acc, const float *q, const float *k, long d) {
    float r = hsum8(acc);
    for (long i = d & ~7L; i < d; i++) r = fmaf(q[i], k[i], r);
    return r;
}
#endif

/* s[l - l0] = scale * q . k[l] for l in [l0, l1) */
static void att_scores(const float *q, const float *kg, long kl, long d, long l0, long l1, float scale, float *s) {
    long l = l0;
#if MS_AVX512 || MS_AVX2
    long d8 = d & ~7L;
    for (; l + 4 <= l1; l += 4) { /* four keys at once: four independent chains */
        const float *k0 = kg + l * kl, *k1 = k0 + kl, *k2 = k1 + kl, *k3 = k2 + kl;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long i = 0; i < d8; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
        }
        s[l - l0] = att_finish(a0, q, k0, d) * scale;
        s[l + 1 - l0] = att_finish(a1, q, k1, d) * scale;
        s[l + 2 - l0] = att_finish(a2, q, k2, d) * scale;
        s[l + 3 - l0] = att_finish(a3, q, k3, d) * scale;
    }
    for (; l < l1; l++) { /* the same arithmetic, one key */
        const float *kr = kg + l * kl;
        __m256 a = _mm256_setzero_ps();
        for (long i = 0; i < d8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kr + i), a);
        s[l - l0] = att_finish(a, q, kr, d) * scale;
    }
#else
    for (; l < l1; l++) {
        const float *kr = kg + l * kl;
        float p[8] = {0};
        long i = 0;
        for (; i + 8 <= d; i += 8)
            for (int j = 0; j < 8; j++) p[j] += q[i + j] * kr[i + j];
        for (; i < d; i++) p[i & 7] += q[i] * kr[i];
        s[l - l0] = (((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))) * scale;
    }
#endif
}

/* acc[c] = fma(p[l], v[l][c], acc[c]) for l in [0, n) in order: a piece of the weighted sum */
static void att_values(const float *p, const float *vg, long vl, long dv, long n, float *acc) {
    long c = 0;
#if MS_AVX512 || MS_AVX2
    for (; c + 32 <= dv; c += 32) { /* 32 outputs in registers across the piece's keys */
        __m256 a0 = _mm256_loadu_ps(acc + c), a1 = _mm256_loadu_ps(acc + c + 8);
        __m256 a2 = _mm256_loadu_ps(acc + c + 16), a3 = _mm256_loadu_ps(acc + c + 24);
        for (long l = 0; l < n; l++) {
            const float *vr = vg + l * vl + c;
            __m256 pv = _mm256_set1_ps(p[l]);
            a0 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr), a0);
            a1 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr + 8), a1);
            a2 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr + 16), a2);
            a3 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr + 24), a3);
        }
        _mm256_storeu_ps(acc + c, a0);
        _mm256_storeu_ps(acc + c + 8, a1);
        _mm256_storeu_ps(acc + c + 16, a2);
        _mm256_storeu_ps(acc + c + 24, a3);
    }
#endif
    for (; c < dv; c++) {
        float a = acc[c];
        for (long l = 0; l < n; l++) a = fmaf(p[l], vg[l * vl + c], a);
        acc[c] = a;
    }
}

#if MS_AVX512 || MS_AVX2
/* Four rows of one position (four query heads of a kv head) at once: each key and value
 * vector is loaded once for the four, from L2, where one row at a time loaded it four
 * times (the blocks' cost grew with the heads a kv head serves). Every (row, key) keeps
 * its own chain of the same FMAs in the same order as att_scores' and att_values', so a
 * row's result is theirs, bit for bit. */
static void att_scores4(const float *const q[4], const float *kg, long kl, long d, long l0, long l1, float scale,
                        float *const s[4]) {
    long d8 = d & ~7L, l = l0;
    for (; l + 2 <= l1; l += 2) { /* two keys, four rows: eight chains */
        const float *k0 = kg + l * kl, *k1 = k0 + kl;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (long i = 0; i < d8; i += 8) {
            __m256 q0 = _mm256_loadu_ps(q[0] + i), q1 = _mm256_loadu_ps(q[1] + i);
            __m256 q2 = _mm256_loadu_ps(q[2] + i), q3 = _mm256_loadu_ps(q[3] + i);
            __m256 kv = _mm256_loadu_ps(k0 + i);
            a0 = _mm256_fmadd_ps(q0, kv, a0);
            a1 = _mm256_fmadd_ps(q1, kv, a1);
            a2 = _mm256_fmadd_ps(q2, kv, a2);
            a3 = _mm256_fmadd_ps(q3, kv, a3);
            kv = _mm256_loadu_ps(k1 + i);
            b0 = _mm256_fmadd_ps(q0, kv, b0);
            b1 = _mm256_fmadd_ps(q1, kv, b1);
            b2 = _mm256_fmadd_ps(q2, kv, b2);
            b3 = _mm256_fmadd_ps(q3, kv, b3);
        }
        __m256 a[4] = {a0, a1, a2, a3}, b[4] = {b0, b1, b2, b3};
        for (int j = 0; j < 4; j++) {
            s[j][l - l0] = att_finish(a[j], q[j], k0, d) * scale;
            s[j][l + 1 - l0] = att_finish(b[j], q[j], k1, d) * scale;
        }
    }
    for (; l < l1; l++) { /* the last key */
        const float *kr = kg + l * kl;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long i = 0; i < d8; i += 8) {
            __m256 kv = _mm256_loadu_ps(kr + i);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q[0] + i), kv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q[1] + i), kv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q[2] + i), kv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q[3] + i), kv, a3);
        }
        __m256 a[4] = {a0, a1, a2, a3};
        for (int j = 0; j < 4; j++) s[j][l - l0] = att_finish(a[j], q[j], kr, d) * scale;
    }
}

/* acc[j][c] = fma(p[j][l], v[l][c], acc[j][c]) for l in [0, n) in order, for R = 2 or 4
 * rows (R = 4 needs the 32 registers of AVX-512): 32 outputs of each row in registers
 * across the piece's keys, as att_values keeps one row's, so the values are read in the
 * same passes (a narrower block read each value row in more, strided passes: slower once
 * the cache no longer fits in L3) */
#define ATT_VALUES_ROWS(R)                                                                                            \
    static void att_values_##R(const float *const p[], const float *vg, long vl, long dv, long n, float *const acc[]) { \
        long c = 0;                                                                                                   \
        for (; c + 32 <= dv; c += 32) {                                                                               \
            __m256 a[R][4];                                                                                           \
            for (int j = 0; j < R; j++)                                                                               \
                for (int m = 0; m < 4; m++) a[j][m] = _mm256_loadu_ps(acc[j] + c + 8 * m);                            \
            for (long l = 0; l < n; l++) {                                                                            \
                const float *vr = vg + l * vl + c;                                                                    \
                __m256 v[4] = {_mm256_loadu_ps(vr), _mm256_loadu_ps(vr + 8), _mm256_loadu_ps(vr + 16),                \
                               _mm256_loadu_ps(vr + 24)};                                                             \
                for (int j = 0; j < R; j++) {                                                                         \
                    __m256 pv = _mm256_set1_ps(p[j][l]);                                                              \
                    for (int m = 0; m < 4; m++) a[j][m] = _mm256_fmadd_ps(pv, v[m], a[j][m]);                         \
                }                                                                                                     \
            }                                                                                                         \
            for (int j = 0; j < R; j++)                                                                               \
                for (int m = 0; m < 4; m++) _mm256_storeu_ps(acc[j] + c + 8 * m, a[j][m]);                            \
        }                                                                                                             \
        for (int j = 0; j < R; j++)                                                                                   \
            for (long cc = c; cc < dv; cc++) {                                                                        \
                float a = acc[j][cc];                                                                                 \
                for (long l = 0; l < n; l++) a = fmaf(p[j][l], vg[l * vl + cc], a);                                   \
                acc[j][cc] = a;                                                                                       \
            }                                                                                                         \
    }
ATT_VALUES_ROWS(2)
#if MS_AVX512
ATT_VALUES_ROWS(4)
#endif

/* four rows' values: at once with AVX-512, two and two with AVX2 */
static void att_values4(const float *const p[4], const float *vg, long vl, long dv, long n, float *const acc[4]) {
#if MS_AVX512
    att_values_4(p, vg, vl, dv, n, acc);
#else
    att_values_2(p, vg, vl, dv, n, acc);
    att_values_2(p + 2, vg, vl, dv, n, acc + 2);
#endif
}
#endif

/* The keys row ``r`` of a kv head's rows sees, [*l0, *l1); returns how many. Row r is the
 * query at position start + r / G, of query head g * G + r % G. */
static long att_range(const attend_args *a, long r, long *l0, long *l1) {
    long pos = a->start + r / a->G;
    *l1 = pos + 1 < a->L ? pos + 1 : a->L;
    *l0 = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
    return *l1 > *l0 ? *l1 - *l0 : 0;
}

/* How many rows from r go through a piece together: four where rows [r, r + 4) of the
 * block are four heads at one position (one key range), with SIMD; else one. */
static inline long att_rows_at_once(const attend_args *a, long r, long r1) {
#if MS_AVX512 || MS_AVX2
    return r + 4 <= r1 && r / a->G == (r + 3) / a->G ? 4 : 1;
#else
    (void)a, (void)r, (void)r1;
    return 1;
#endif
}

/* The next piece, rows [e, e + keys) below hi of ``base`` (``w`` floats a row, ``ld``
 * apart), on its way to L2 while this one is used, where a kv head serves four or more
 * heads (the four-row loops, heavier in arithmetic, let the memory stream fall behind). */
static inline void att_prefetch(const attend_args *a, const float *base, long ld, long w, long e, long hi) {
#if MS_AVX512 || MS_AVX2
    for (long l = e; a->G >= 4 && l < e + a->keys && l < hi; l++)
        for (long i = 0; i < w; i += 16) _mm_prefetch((const char *)(base + l * ld + i), _MM_HINT_T1);
#else
    (void)a, (void)base, (void)ld, (void)w, (void)e, (void)hi;
#endif
}

/* Rows [r0, r1) of kv head g; s: (r1 - r0) * L floats, acc: (r1 - r0) * (dv + 1). */
static void attend_block(const attend_args *a, long g, long r0, long r1, float *s, float *acc) {
    const float *kg = a->k + g * a->kh, *vg = a->v + g * a->vh;
    float *sums = acc + (r1 - r0) * a->dv;
    long lo = a->L, hi = 0, l0, l1;
    for (long r = r0; r < r1; r++)
        if (att_range(a, r, &l0, &l1) > 0) {
            lo = l0 < lo ? l0 : lo;
            hi = l1 > hi ? l1 : hi;
        }
    for (long b = lo; b < hi; b += a->keys) { /* scores: a piece of keys, then each row over it */
        long e = b + a->keys < hi ? b + a->keys : hi;
        att_prefetch(a, kg, a->kl, a->d, e, hi);
        for (long r = r0; r < r1;) {
            att_range(a, r, &l0, &l1);
            long x = b > l0 ? b : l0, y = e < l1 ? e : l1, n = att_rows_at_once(a, r, r1);
            const float *q = a->q + (g * a->G + r % a->G) * a->qh + (r / a->G) * a->qt;
#if MS_AVX512 || MS_AVX2
            if (n == 4) {
                const float *qs[4] = {q, q + a->qh, q + 2 * a->qh, q + 3 * a->qh};
                float *ss[4];
                for (int j = 0; j < 4; j++) ss[j] = s + (r + j - r0) * a->L + (x - l0);
                if (x < y) att_scores4(qs, kg, a->kl, a->d, x, y, a->scale, ss);
            }
#endif
            if (n == 1 && x < y) att_scores(q, kg, a->kl, a->d, x, y, a->scale, s + (r - r0) * a->L + (x - l0));
            r += n;
        }
    }
    for (long r = r0; r < r1; r++) { /* each row's softmax, in order of l */
        long h = g * a->G + r % a->G, n = att_range(a, r, &l0, &l1);
        float *sr = s + (r - r0) * a->L, m = a->sinks ? a->sinks[h] : -INFINITY, sum = 0.0f;
        for (long l = 0; l < n; l++) m = sr[l] > m ? sr[l] : m;
        if (a->sinks) sum = expf(a->sinks[h] - m);
        for (long l = 0; l < n; l++) {
            sr[l] = expf(sr[l] - m);
            sum += sr[l];
        }
        sums[r - r0] = sum;
        memset(acc + (r - r0) * a->dv, 0, (size_t)a->dv * sizeof(float));
    }
    for (long b = lo; b < hi; b += a->keys) { /* values: the same pieces */
        long e = b + a->keys < hi ? b + a->keys : hi;
        att_prefetch(a, vg, a->vl, a->dv, e, hi);
        for (long r = r0; r < r1;) {
            att_range(a, r, &l0, &l1);
            long x = b > l0 ? b : l0, y = e < l1 ? e : l1, n = att_rows_at_once(a, r, r1);
#if MS_AVX512 || MS_AVX2
            if (n == 4) {
                const float *ps[4];
                float *accs[4];
                for (int j = 0; j < 4; j++) {
                    ps[j] = s + (r + j - r0) * a->L + (x - l0);
                    accs[j] = acc + (r + j - r0) * a->dv;
                }
                if (x < y) att_values4(ps, vg + x * a->vl, a->vl, a->dv, y - x, accs);
            }
#endif
            if (n == 1 && x < y)
                att_values(s + (r - r0) * a->L + (x - l0), vg + x * a->vl, a->vl, a->dv, y - x, acc + (r - r0) * a->dv);
            r += n;
        }
    }
    for (long r = r0; r < r1; r++) { /* divided by the sum; a row that sees no key: zeros, as SDPA */
        float *o = a->out + (r / a->G) * a->H * a->dv + (g * a->G + r % a->G) * a->dv, *ar = acc + (r - r0) * a->dv;
        long n = att_range(a, r, &l0, &l1);
        for (long c = 0; c < a->dv; c++) o[c] = n > 0 ? ar[c] / sums[r - r0] : 0.0f;
    }
}

static void attend_job(void *p) {
    attend_args *a = p;
    long L = a->L > 0 ? a->L : 1, per = a->G * a->T; /* a kv head's rows */
    float *s = malloc((size_t)a->rows * (L + a->dv + 1) * sizeof(float));
    if (!s) return; /* the units left to the others (none left at all: ms_attend says 0) */
    for (long u; (u = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed)) < a->blocks * (a->H / a->G);) {
        long g = u / a->blocks, r0 = (u % a->blocks) * a->rows, r1 = r0 + a->rows < per ? r0 + a->rows : per;
        if (r0 < r1) attend_block(a, g, r0, r1, s, s + a->rows * L);
    }
    free(s);
}

/* out[T, H * dv] (contiguous) from q [H, T, d], k [Hkv, L, d], v [Hkv, L, dv] (strides in
 * elements, the last dimension contiguous); window <= 0: none; sinks [H] or NULL. Returns 0 when scratch
 * memory could not be had (nothing trustworthy was written: the caller falls back). */
int ms_attend(const float *q, long qh, long qt, const float *k, long kh, long kl, const float *v, long vh, long vl,
              const float *sinks, float *out, long H, long Hkv, long T, long L, long d, long dv, long start, long window,
              float scale) {
    long G = H / Hkv, per = G * T, nth = pool.nth > 1 ? pool.nth : 1;
    if (per <= 0 || Hkv <= 0) return 1; /* nothing to attend */
    long keys = window > 0 && window + T < L ? window + T : L; /* at most, a query */
    int share = T * H * keys * (d + dv) >= (1L << 18);
    /* about two blocks a thread over the kv heads (a block reads its kv head once), each
     * holding at most 16 MiB of scores */
    long blocks = ((share ? 2 * nth : 1) + Hkv - 1) / Hkv, cap = (1L << 22) / (L > 0 ? L : 1);
    cap = cap > 0 ? cap : 1;
    blocks = blocks > (per + cap - 1) / cap ? blocks : (per + cap - 1) / cap;
    blocks = blocks < per ? blocks : per;
    long piece = (32768 / (d > dv ? d : dv)) & ~3L; /* keys a piece: about 128 KiB of keys, then of values */
    attend_args a = {.q = q, .k = k, .v = v, .sinks = sinks, .out = out, .qh = qh, .qt = qt, .kh = kh, .kl = kl, .vh = vh, .vl = vl,
                     .H = H, .G = G, .T = T, .L = L, .d = d, .dv = dv, .start = start, .window = window,
                     .rows = (per + blocks - 1) / blocks, .blocks = blocks, .keys = piece > 4 ? piece : 4,
                     .scale = scale, .next = 0};
    run(attend_job, &a, share);
    return atomic_load_explicit(&a.next, memory_order_relaxed) >= a.blocks * Hkv;
}

/* ------------------------------------------------------------------------------------ */
/* A decoder layer's attention for T <= 64 rows in one call (models/base.py Attention's  */
/* forward, the CPU kernels' way): qkv = x Wqkv^T (+ b), with qn / kn each head of q / k  */
/* RMS-normalized (Qwen3's q_norm, k_norm; ms_rmsnorm), q and k rotated (half-split      */
/* rotary over the whole head), k and v written into the cache at [start, start + T),    */
/* attention over positions [0, start + T), y = o Wo^T (+ b). The same calls in the same  */
/* order as the module's ops (ms_linear, ms_rope, a copy, ms_attend, ms_linear), so the   */
/* result is theirs bit for bit; what it saves is two dozen small torch ops and five      */
/* ctypes calls a layer. kc, vc: the layer's cache buffers [Hkv, cap, d] with strides     */
/* (kh, kl) and (vh, vl) in elements; scratch: ms_attn_block_scratch(T, H, Hkv, d)        */
/* floats. Returns 0 where ms_attend found no memory (the cache is written; the caller's  */
/* torch path then computes the layer, writing the same values again).                   */

long ms_attn_block_scratch(long T, long H, long Hkv, long d) { return T * (H + 2 * Hkv) * d + 2 * T * H * d; }

int ms_attn_block(const float *x, long T, long hidden, const void *wqkv, int wt_qkv, const float *bqkv, const void *wo,
                  int wt_o, const float *bo, const float *qn, const float *kn, float eps, const float *cos,
                  const float *sin, float *kc, long kh, long kl, float *vc, long vh, long vl, long start, long H, long Hkv,
                  long d, long window, float scale, float *scratch, float *y) {
    long n = (H + 2 * Hkv) * d;
    float *qkv = scratch, *q = qkv + T * n, *att = q + T * H * d;
    ms_linear(x, wqkv, wt_qkv, bqkv, qkv, T, n, hidden);
    for (long t = 0; t < T && qn; t++) { /* in place: each row's sum is taken before it is written */
        ms_rmsnorm(qkv + t * n, qn, eps, qkv + t * n, H, d);
        ms_rmsnorm(qkv + t * n + H * d, kn, eps, qkv + t * n + H * d, Hkv, d);
    }
    rope_to(qkv, d, n, cos, sin, q, T * d, d, H, T, d);                            /* q [H, T, d] */
    rope_to(qkv + H * d, d, n, cos, sin, kc + start * kl, kh, kl, Hkv, T, d);      /* into the cache */
    for (long g = 0; g < Hkv; g++)
        for (long t = 0; t < T; t++)
            memcpy(vc + g * vh + (start + t) * vl, qkv + t * n + (H + Hkv) * d + g * d, (size_t)d * sizeof(float));
    if (!ms_attend(q, T * d, d, kc, kh, kl, vc, vh, vl, NULL, att, H, Hkv, T, start + T, d, d, start, window, scale))
        return 0;
    ms_linear(att, wo, wt_o, bo, y, T, hidden, H * d);
    return 1;
}

/* ------------------------------------------------------------------------------------ */
/* Routing by softmax then top-k (models/base.py softmax_topk: Mixtral, Qwen-MoE, Qwen3-  */
/* MoE, OLMoE): for each of T rows of E logits, p = softmax(l) in float32 (the max taken  */
/* off first), the k largest p in descending order (ties: the lower expert first) into    */
/* ids[t, :k], and their p into w[t, :k], divided by their sum (in order) when            */
/* ``normalize``. One call where torch takes five ops (softmax, topk, sum, a division, a  */
/* cast): about 8 us a layer in Python, 0.2 here. k <= E <= 1024.                          */

int ms_route_softmax(const float *logits, long T, long E, long k, int normalize, int64_t *ids, float *w) {
    if (T < 0 || E < 1 || E > 1024 || k < 1 || k > E) return 0;
    float p[1024];
    for (long t = 0; t < T; t++) {
        const float *l = logits + t * E;
        float m = l[0], sum = 0.0f;
        for (long e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
        for (long e = 0; e < E; e++) {
            p[e] = expf(l[e] - m);
            sum += p[e];
        }
        for (long e = 0; e < E; e++) p[e] = p[e] / sum;
        int64_t *it = ids + t * k;
        float *wt = w + t * k;
        for (long j = 0; j < k; j++) { /* selection: k is a few, E at most a few hundred */
            long best = -1;
            for (long e = 0; e < E; e++) {
                int taken = 0;
                for (long i = 0; i < j; i++) taken |= it[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            it[j] = best;
            wt[j] = p[best];
        }
        if (normalize) {
            float s = 0.0f;
            for (long j = 0; j < k; j++) s += wt[j];
            for (long j = 0; j < k; j++) wt[j] = wt[j] / s;
        }
    }
    return 1;
}

/* ------------------------------------------------------------------------------------ */
/* A whole decoder layer in one call (models/base.py DecoderLayer over a plain Attention  */
/* and a SparseMoE routed by softmax_topk with every expert in memory): the module path's */
/* kernels in its order, and its two residual additions, so the same bits:               */
/*   h = rmsnorm(x, norm1); r = x + attn_block(h); h = rmsnorm(r, norm2);                 */
/*   ids, w = route(h Wr^T); y = r + moe(h, ids, w).                                       */
/* What it saves is the Python between them: about 60 us a layer on this 2-core VM, most  */
/* of a small model's step. The layer's weights are described once (ms_layer, filled by   */
/* kernels/__init__.py); a call passes what changes: the rows, the rotary tables, the     */
/* cache and its length. Returns 1, or 0 where a part refused (attention without memory, */
/* routing the experts do not take): nothing of y is then trustworthy and the caller      */
/* computes the layer its own way (the cache rows written again, the same values).        */

typedef struct {
    long hidden, H, Hkv, d, window, E, k, I;
    float scale, eps1, eps2, qk_eps;
    int wt_qkv, wt_o, wt_r, wt_e, act, normalize;
    const float *norm1, *norm2, *bqkv, *bo, *qn, *kn;
    const void *wqkv, *wo, *wr;
    const void *const *gate, *const *up, *const *down;
} ms_layer;

long ms_layer_scratch(const ms_layer *L, long T) {
    long attn = ms_attn_block_scratch(T, L->H, L->Hkv, L->d), moe = 2 * T * L->I + 2 * T * L->hidden;
    return 2 * T * L->hidden + T * L->E + T * L->k + 2 * T * L->k + (attn > moe ? attn : moe);
}

int ms_layer_forward(const ms_layer *L, const float *x, long T, const float *cos, const float *sin, float *kc, long kh,
                     long kl, float *vc, long vh, long vl, long start, float *scratch, float *y) {
    long n = T * L->hidden;
    if (T < 1 || T > MAX_MOE_ROWS) return 0;
    int64_t *ids = (int64_t *)scratch; /* first: 8-byte aligned as the scratch is (2 * T * k floats) */
    float *h = scratch + 2 * T * L->k, *a = h + n, *logits = a + n, *w = logits + T * L->E, *work = w + T * L->k;
    ms_rmsnorm(x, L->norm1, L->eps1, h, T, L->hidden);
    if (!ms_attn_block(h, T, L->hidden, L->wqkv, L->wt_qkv, L->bqkv, L->wo, L->wt_o, L->bo, L->qn, L->kn, L->qk_eps,
                       cos, sin, kc, kh, kl, vc, vh, vl, start, L->H, L->Hkv, L->d, L->window, L->scale, work, a))
        return 0;
    for (long i = 0; i < n; i++) y[i] = x[i] + a[i];
    ms_rmsnorm(y, L->norm2, L->eps2, h, T, L->hidden);
    ms_linear(h, L->wr, L->wt_r, NULL, logits, T, L->E, L->hidden);
    if (!ms_route_softmax(logits, T, L->E, L->k, L->normalize, ids, w)) return 0;
    if (ms_moe(h, T, L->hidden, L->I, L->k, L->E, ids, w, L->gate, L->up, L->down, L->wt_e, L->act, work, a) != 0)
        return 0;
    for (long i = 0; i < n; i++) y[i] = y[i] + a[i];
    return 1;
}

/* ------------------------------------------------------------------------------------ */
/* Greedy decoding's choice: for each of R rows of N logits, the index of the first       */
/* maximum into out[r]. Returns 0 (out unspecified) if any logit is NaN or infinite: the  */
/* caller refuses such logits (runtime/sampling.py). One pass for the maximum and the     */
/* check, one to find it, where numpy's argmax and a float64 sum took two reads and ~12 us */
/* a token on a 32k vocabulary.                                                            */

static int finite_max(const float *x, long n, float *best) {
    long i = 0;
    float m = -INFINITY;
    int bad = 0;
#if MS_AVX512
    const __m512i expo = _mm512_set1_epi32(0x7f800000);
    __m512 mv = _mm512_set1_ps(-INFINITY);
    __mmask16 nonfinite = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m512i e = _mm512_and_si512(_mm512_castps_si512(v), expo);
        nonfinite |= _mm512_cmpeq_epi32_mask(e, expo);
        mv = _mm512_max_ps(mv, v);
    }
    bad = nonfinite != 0;
    m = _mm512_reduce_max_ps(mv);
#endif
    for (; i < n; i++) {
        bad |= !isfinite(x[i]);
        m = x[i] > m ? x[i] : m;
    }
    *best = m;
    return !bad;
}

int ms_argmax(const float *x, long R, long N, int64_t *out) {
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * N;
        float m;
        if (N < 1 || !finite_max(xr, N, &m)) return 0;
        long i = 0;
        while (xr[i] != m) i++;
        out[r] = i;
    }
    return 1;
}

/* ------------------------------------------------------------------------------------ */
/* A whole forward pass of a model every layer of which ms_layer_forward takes (models/  */
/* base.py CausalLM.forward): the embedding rows widened to fp32, the layers in order, the */
/* final RMSNorm and the head, over the last row only where ``last_only``. The module     */
/* path's kernels in its order, so the same bits; what it saves is a small model's        */
/* Python between layers (embedding, head, module calls: about 60 us a token on the       */
/* demo). kc[i], vc[i]: layer i's cache buffers with strides kst[2i], kst[2i+1] (and vst); */
/* scratch: ms_model_scratch floats. Returns 1, or 0 where a part refused (an id outside  */
/* the vocabulary, a layer's refusal): then the caller runs the module path (the cache    */
/* rows rewritten, the same values).                                                     */

long ms_model_scratch(const ms_layer *const *layers, long n_layers, long T) {
    long most = 0;
    for (long i = 0; i < n_layers; i++) {
        long s = ms_layer_scratch(layers[i], T);
        most = s > most ? s : most;
    }
    return 3 * T * layers[0]->hidden + most;
}

int ms_model_forward(const ms_layer *const *layers, long n_layers, const void *embed, int wt_embed, long vocab,
                     const int64_t *ids, long T, const float *cos, const float *sin, float *const *kc, const long *kst,
                     float *const *vc, const long *vst, long start, const float *norm, float eps, const void *head,
                     int wt_head, const float *head_bias, int last_only, float *scratch, float *logits) {
    long H = layers[0]->hidden;
    if (T < 1 || T > MAX_MOE_ROWS || n_layers < 1) return 0;
    for (long t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= vocab) return 0;
    float *x = scratch, *y = x + T * H, *h = y + T * H, *work = h + T * H;
    for (long t = 0; t < T; t++)
        for (long c = 0; c < H; c++) x[t * H + c] = widen_scalar(embed, wt_embed, ids[t] * H + c);
    for (long i = 0; i < n_layers; i++) {
        if (!ms_layer_forward(layers[i], x, T, cos, sin, kc[i], kst[2 * i], kst[2 * i + 1], vc[i], vst[2 * i],
                              vst[2 * i + 1], start, work, y))
            return 0;
        float *swap = x;
        x = y;
        y = swap;
    }
    long R = last_only ? 1 : T;
    const float *rows = x + (T - R) * H;
    ms_rmsnorm(rows, norm, eps, h, R, H);
    ms_linear(h, head, wt_head, head_bias, logits, R, vocab, H);
    return 1;
}
