/* The two halves of a one-token ("decode") step on x86-64 CPUs with AVX2 and FMA.
 *
 * Compiled on first use by decode_kernel.py and called through ctypes; docs/decode.md measures it.
 * A decode step reads every weight and the whole merged KV once, so its floor is the memory
 * bandwidth; torch's CPU kernels read both at a third to a half of it here (docs/decode.md).
 *
 * pc_decode_attention: out[b, h, g, :] = softmax(q[b, h, g, :] . K[b, h, t, :] over t) @ V[b, h]
 * for the G query rows of each KV head (packed GQA), every cached key visible (a decode step has
 * no mask). Each thread streams one contiguous share of all heads' keys once, in blocks of BLOCK
 * keys: the block's scores (fp32 dot products), an online softmax (FlashAttention's running max
 * and sum; Dao et al. 2022, Alg. 1), then the block's values weighted into fp32 accumulators,
 * prefetching the rows it reads next. The shares merge by their log-sum-exps, as split-KV "flash
 * decoding" does.
 *
 * pc_linear: y = W x (+ b) for one row x, four weight rows per pass over x, prefetching the rows
 * PREFETCH_GROUPS groups ahead.
 *
 * pc_decode_step: a whole one-token step of a Llama-family decoder (every layer, the final norm
 * and the LM head) on the two functions above, with no per-operator dispatch between them.
 *
 * Weights, keys and values are float32 or bfloat16 (widened to fp32 on load); arithmetic is fp32.
 * Threads come from OpenMP: torch's CPU wheel already loaded libgomp.so.1 into the process, so
 * these parallel regions share torch's thread pool instead of starting threads of their own.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 64
#define MAX_G 16
#define MAX_D 256
#define SERIAL_KEYS 4096        /* fewer (head, key) pairs than this run on one thread */
#define SERIAL_WEIGHTS 65536    /* as do products with fewer weights than this */
#define PREFETCH_GROUPS 4       /* pc_linear reads rows this many 4-row groups ahead (docs/decode.md) */

typedef struct {
    const float *q;            /* (B, H, G, D) contiguous, already multiplied by the softmax scale */
    const void *k, *v;         /* rows of D (Dv) contiguous elements; strides in elements */
    int bf16;                  /* 1: k and v hold bfloat16, 0: float32 */
    long B, H, G, T, D, Dv;
    long ks_b, ks_h, ks_t, vs_b, vs_h, vs_t;
    long threads;
    float *part;               /* per (thread, b*H + h): G maxima, G sums, G*Dv accumulators */
} Job;

static inline __m256 load8(const void *base, long i, int bf16) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)base + i);
}

static inline float hsum(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) for x <= 0: Cephes' expf (range reduction by ln 2, degree-5 polynomial, ~1 ulp). */
static inline __m256 exp8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, one));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* Keys [t0, t1) of head bh into the running (max, sum, accumulators) at `part`. */
static inline __attribute__((always_inline)) void attend_range_as(const Job *j, long bh, long t0, long t1, float *part,
                                                                 const int bf16) {
    const long G = j->G, D = j->D, Dv = j->Dv, b = bh / j->H, h = bh % j->H;
    const char *k = (const char *)j->k, *v = (const char *)j->v;
    const long size = bf16 ? 2 : 4;
    const char *kb = k + (b * j->ks_b + h * j->ks_h) * size, *vb = v + (b * j->vs_b + h * j->vs_h) * size;
    const float *q = j->q + bh * G * D;
    float *mx = part, *sum = part + G, *acc = part + 2 * G;
    float s[MAX_G][BLOCK] __attribute__((aligned(32)));

    for (long t = t0; t < t1; t += BLOCK) {
        const long n = t1 - t < BLOCK ? t1 - t : BLOCK;
        for (long i = 0; i < n; i++) {
            const void *row = kb + (t + i) * j->ks_t * size;
            /* keep memory busy through the compute: this block's value rows, the next block's keys */
            const char *vrow = vb + (t + i) * j->vs_t * size, *knext = (const char *)row + BLOCK * j->ks_t * size;
            for (long x = 0; x < Dv * size; x += 64) _mm_prefetch(vrow + x, _MM_HINT_T0);
            if (t + BLOCK + i < t1)
                for (long x = 0; x < D * size; x += 64) _mm_prefetch(knext + x, _MM_HINT_T0);
            for (long g = 0; g < G; g++) {
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                long d = 0;
                for (; d + 16 <= D; d += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), load8(row, d, bf16), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d + 8), load8(row, d + 8, bf16), a1);
                }
                if (d < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), load8(row, d, bf16), a0);
                s[g][i] = hsum(_mm256_add_ps(a0, a1));
            }
        }
        for (long g = 0; g < G; g++) {
            float top = mx[g];
            for (long i = 0; i < n; i++) top = s[g][i] > top ? s[g][i] : top;
            const float rescale = expf(mx[g] - top);  /* 0 on the first block (mx = -inf) */
            mx[g] = top;
            __m256 total = _mm256_setzero_ps();
            long i = 0;
            for (; i + 8 <= n; i += 8) {
                __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(&s[g][i]), _mm256_set1_ps(top)));
                _mm256_store_ps(&s[g][i], p);
                total = _mm256_add_ps(total, p);
            }
            float tail = 0.0f;
            for (; i < n; i++) tail += s[g][i] = expf(s[g][i] - top);
            sum[g] = sum[g] * rescale + hsum(total) + tail;
            /* 8 independent accumulators per pass, so that no FMA waits for the previous one */
            float *a = acc + g * Dv;
            long d = 0;
            for (; d + 64 <= Dv; d += 64) {
                __m256 r[8];
                for (int c = 0; c < 8; c++) r[c] = _mm256_mul_ps(_mm256_loadu_ps(a + d + 8 * c), _mm256_set1_ps(rescale));
                const char *row = vb + t * j->vs_t * size;
                for (long i2 = 0; i2 < n; i2++, row += j->vs_t * size) {
                    const __m256 p = _mm256_set1_ps(s[g][i2]);
                    for (int c = 0; c < 8; c++) r[c] = _mm256_fmadd_ps(p, load8(row, d + 8 * c, bf16), r[c]);
                }
                for (int c = 0; c < 8; c++) _mm256_storeu_ps(a + d + 8 * c, r[c]);
            }
            for (; d < Dv; d += 8) {
                __m256 r = _mm256_mul_ps(_mm256_loadu_ps(a + d), _mm256_set1_ps(rescale));
                const char *row = vb + t * j->vs_t * size;
                for (long i2 = 0; i2 < n; i2++, row += j->vs_t * size)
                    r = _mm256_fmadd_ps(_mm256_set1_ps(s[g][i2]), load8(row, d, bf16), r);
                _mm256_storeu_ps(a + d, r);
            }
        }
    }
}

static void attend_range(const Job *j, long bh, long t0, long t1, float *part) {
    if (j->bf16) attend_range_as(j, bh, t0, t1, part, 1);
    else attend_range_as(j, bh, t0, t1, part, 0);
}

/* Thread `id` takes the id-th of `threads` equal shares of the B*H*T (head, key) pairs. */
static void run_share(const Job *j, long id) {
    const long heads = j->B * j->H, total = heads * j->T, width = 2 * j->G + j->G * j->Dv;
    const long lo = total * id / j->threads, hi = total * (id + 1) / j->threads;
    for (long bh = lo / j->T; bh < heads && bh * j->T < hi; bh++) {
        long t0 = bh * j->T > lo ? 0 : lo - bh * j->T, t1 = (bh + 1) * j->T < hi ? j->T : hi - bh * j->T;
        if (t0 < t1) attend_range(j, bh, t0, t1, j->part + (id * heads + bh) * width);
    }
}

/* Attention of the packed query rows; 0 on success, 1 for shapes outside the limits, 2 without memory. */
int pc_decode_attention(const float *q, const void *k, const void *v, float *out, int bf16,
                        long B, long H, long G, long T, long D, long Dv,
                        long ks_b, long ks_h, long ks_t, long vs_b, long vs_h, long vs_t, long threads) {
    if (G < 1 || G > MAX_G || T < 1 || D < 8 || D > MAX_D || D % 8 || Dv < 8 || Dv > MAX_D || Dv % 8)
        return 1;
    if (B * H * T < SERIAL_KEYS || threads < 1) threads = 1;
    const long heads = B * H, width = 2 * G + G * Dv;
    float *part = (float *)malloc(sizeof(float) * threads * heads * width);
    if (!part) return 2;
    for (long i = 0; i < threads * heads; i++) {
        float *p = part + i * width;
        for (long g = 0; g < G; g++) { p[g] = -INFINITY; p[G + g] = 0.0f; }
        for (long x = 2 * G; x < width; x++) p[x] = 0.0f;
    }
    Job job = {q, k, v, bf16, B, H, G, T, D, Dv, ks_b, ks_h, ks_t, vs_b, vs_h, vs_t, threads, part};
#pragma omp parallel num_threads(threads)
    {
        /* the pool may grant fewer threads than asked: then each takes every got-th share */
        const int id = omp_get_thread_num(), got = omp_get_num_threads();
        for (long share = id; share < threads; share += got) run_share(&job, share);
    }

    for (long bh = 0; bh < heads; bh++)
        for (long g = 0; g < G; g++) {
            float top = -INFINITY, total = 0.0f;
            for (int i = 0; i < threads; i++) {
                const float m = part[(i * heads + bh) * width + g];
                top = m > top ? m : top;
            }
            float *o = out + (bh * G + g) * Dv;
            for (long d = 0; d < Dv; d++) o[d] = 0.0f;
            for (int i = 0; i < threads; i++) {
                const float *p = part + (i * heads + bh) * width;
                if (p[G + g] == 0.0f) continue;  /* this thread saw no key of the head */
                const float w = expf(p[g] - top);
                total += w * p[G + g];
                for (long d = 0; d < Dv; d++) o[d] += w * p[2 * G + g * Dv + d];
            }
            for (long d = 0; d < Dv; d++) o[d] /= total;
        }
    free(part);
    return 0;
}

/* Rows [r0, r0 + n) of w (n <= 4) against x: four rows share each load of x. */
static inline __attribute__((always_inline)) void rows_as(const float *x, const char *w, long ws, long K, long r0,
                                                          long n, const float *bias, float *y, const int bf16) {
    const long size = bf16 ? 2 : 4;
    const char *row[4];
    for (long r = 0; r < 4; r++) row[r] = w + (r0 + (r < n ? r : 0)) * ws * size;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    const long ahead = 4 * PREFETCH_GROUPS * ws * size;  /* the same columns, PREFETCH_GROUPS groups on */
    for (long k = 0; k < K; k += 8) {
        if ((k * size) % 64 == 0)  /* one prefetch per cache line of each row */
            for (long r = 0; r < 4; r++) _mm_prefetch(row[r] + ahead + k * size, _MM_HINT_T0);
        const __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(xv, load8(row[0], k, bf16), a0);
        a1 = _mm256_fmadd_ps(xv, load8(row[1], k, bf16), a1);
        a2 = _mm256_fmadd_ps(xv, load8(row[2], k, bf16), a2);
        a3 = _mm256_fmadd_ps(xv, load8(row[3], k, bf16), a3);
    }
    const float sums[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (long r = 0; r < n; r++) y[r0 + r] = sums[r] + (bias ? bias[r0 + r] : 0.0f);
}

/* y = w x (+ bias) for one row x of K floats and w of N rows (row stride ws elements, float32 or
 * bfloat16): a one-token step's projections, which torch's GEMV reads at a third of the bandwidth
 * here (docs/decode.md). Threads take contiguous runs of 4-row groups. 0 on success, 1 when K is
 * not a multiple of 8. */
int pc_linear(const float *x, const void *w, const float *bias, float *y, int bf16, long N, long K, long ws,
              long threads) {
    if (K < 8 || K % 8) return 1;
    const long groups = (N + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (N * K >= SERIAL_WEIGHTS)
    for (long i = 0; i < groups; i++) {
        const long n = N - 4 * i < 4 ? N - 4 * i : 4;
        if (bf16) rows_as(x, (const char *)w, ws, K, 4 * i, n, bias, y, 1);
        else rows_as(x, (const char *)w, ws, K, 4 * i, n, bias, y, 0);
    }
    return 0;
}

/* ---- The whole one-token step of a Llama-family decoder (llama, mistral, qwen2, qwen3) ----
 *
 * pc_decode_step runs every layer, the final norm and the LM head of one token in one call, so
 * that a step pays no per-operator dispatch (the ~20 ms of norms, rotary embedding, adds and
 * module calls per step that torch spends between the kernels above at 30 layers here). It
 * computes what transformers' modeling code computes, in the same order, and in a bfloat16
 * model rounds each intermediate to bfloat16 where transformers does: after each projection,
 * norm, product and residual add. */

/* Per-layer table (int64 fields, this order); 0 for an absent tensor. Weights, norm weights and the
 * cache are in the model's dtype; biases are float32. */
enum { W_IN_NORM, W_Q, W_K, W_V, W_O, W_POST_NORM, W_GATE, W_UP, W_DOWN,
       B_Q, B_K, B_V, B_O, B_GATE, B_UP, B_DOWN, W_Q_NORM, W_K_NORM,
       C_K, C_V, C_HEAD_STRIDE, C_HELD, FIELDS };

static inline float round_bf16(float x) {  /* round to nearest even, as torch's float -> bfloat16 */
    union { float f; uint32_t u; } v = {x};
    v.u = (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) & 0xFFFF0000u;
    return v.f;
}

static inline float load1(const void *base, long i, int bf16) {
    if (bf16) {
        union { uint32_t u; float f; } v = {(uint32_t)((const uint16_t *)base)[i] << 16};
        return v.f;
    }
    return ((const float *)base)[i];
}

static void round_all(float *x, long n, int bf16) {
    if (bf16) for (long i = 0; i < n; i++) x[i] = round_bf16(x[i]);
}

/* RMSNorm (LlamaRMSNorm): w * (x * rsqrt(mean(x^2) + eps)), the normalised row rounded first. */
static void rms_norm(const float *x, const void *w, float *y, long n, float eps, int bf16) {
    float ss = 0.0f;
    for (long i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (long i = 0; i < n; i++) {
        const float h = bf16 ? round_bf16(x[i] * r) : x[i] * r;
        y[i] = bf16 ? round_bf16(load1(w, i, 1) * h) : load1(w, i, 0) * h;
    }
}

/* transformers' apply_rotary_pos_emb on each head of x: x*cos + rotate_half(x)*sin. */
static void rotate(float *x, long heads, long D, const float *cos, const float *sin, int bf16) {
    const long half = D / 2;
    for (long h = 0; h < heads; h++) {
        float *r = x + h * D;
        for (long i = 0; i < half; i++) {
            const float a = r[i], b = r[i + half];
            float lo1 = a * cos[i], lo2 = -b * sin[i], hi1 = b * cos[i + half], hi2 = a * sin[i + half];
            if (bf16) { lo1 = round_bf16(lo1); lo2 = round_bf16(lo2); hi1 = round_bf16(hi1); hi2 = round_bf16(hi2); }
            r[i] = bf16 ? round_bf16(lo1 + lo2) : lo1 + lo2;
            r[i + half] = bf16 ? round_bf16(hi1 + hi2) : hi1 + hi2;
        }
    }
}

/* x (already rounded to bfloat16 in a bfloat16 model, so truncation is exact) into the cache at element i. */
static void store_row(void *base, long i, const float *x, long n, int bf16) {
    for (long d = 0; d < n; d++) {
        union { float f; uint32_t u; } v = {x[d]};
        if (bf16) ((uint16_t *)base)[i + d] = (uint16_t)(v.u >> 16);
        else ((float *)base)[i + d] = x[d];
    }
}

static int project(const float *x, int64_t w, int64_t b, float *y, long N, long K, int bf16, long threads) {
    const int code = pc_linear(x, (const void *)w, (const float *)b, y, bf16, N, K, K, threads);
    round_all(y, N, bf16);
    return code;
}

/* One token through L layers, the final norm and the LM head: x (hidden floats, the token's
 * embedding row) is overwritten; logits gets vocab floats. Each layer's cache holds C_HELD tokens
 * and has room for one more, which this step writes. 0 on success, else pc_linear's or
 * pc_decode_attention's code, or 2 without memory. */
int pc_decode_step(float *x, const int64_t *layers, long L, const void *final_norm, const void *lm_head,
                   float *logits, const float *cos, const float *sin, int bf16, long hidden, long heads,
                   long kv_heads, long D, long inter, long vocab, double eps, double scale, long threads) {
    const long G = heads / kv_heads;
    float *buf = (float *)malloc(sizeof(float) * (2 * hidden + 2 * heads * D + 2 * kv_heads * D + 2 * inter));
    if (!buf) return 2;
    float *h = buf, *o = h + hidden, *q = o + hidden, *att = q + heads * D, *k = att + heads * D,
          *v = k + kv_heads * D, *g = v + kv_heads * D, *u = g + inter;
    int code = 0;
    for (long l = 0; l < L && !code; l++) {
        const int64_t *t = layers + l * FIELDS;
        rms_norm(x, (const void *)t[W_IN_NORM], h, hidden, (float)eps, bf16);
        code |= project(h, t[W_Q], t[B_Q], q, heads * D, hidden, bf16, threads);
        code |= project(h, t[W_K], t[B_K], k, kv_heads * D, hidden, bf16, threads);
        code |= project(h, t[W_V], t[B_V], v, kv_heads * D, hidden, bf16, threads);
        if (t[W_Q_NORM])
            for (long i = 0; i < heads; i++) rms_norm(q + i * D, (const void *)t[W_Q_NORM], q + i * D, D, (float)eps, bf16);
        if (t[W_K_NORM])
            for (long i = 0; i < kv_heads; i++) rms_norm(k + i * D, (const void *)t[W_K_NORM], k + i * D, D, (float)eps, bf16);
        rotate(q, heads, D, cos, sin, bf16);
        rotate(k, kv_heads, D, cos, sin, bf16);
        const long held = t[C_HELD], hs = t[C_HEAD_STRIDE];
        for (long i = 0; i < kv_heads; i++) {
            store_row((void *)t[C_K], i * hs + held * D, k + i * D, D, bf16);
            store_row((void *)t[C_V], i * hs + held * D, v + i * D, D, bf16);
        }
        for (long i = 0; i < heads * D; i++) q[i] *= (float)scale;
        code |= pc_decode_attention(q, (const void *)t[C_K], (const void *)t[C_V], att, bf16, 1, kv_heads, G,
                                    held + 1, D, D, 0, hs, D, 0, hs, D, threads);
        round_all(att, heads * D, bf16);
        code |= project(att, t[W_O], t[B_O], o, hidden, heads * D, bf16, threads);
        for (long i = 0; i < hidden; i++) x[i] = bf16 ? round_bf16(x[i] + o[i]) : x[i] + o[i];
        rms_norm(x, (const void *)t[W_POST_NORM], h, hidden, (float)eps, bf16);
        code |= project(h, t[W_GATE], t[B_GATE], g, inter, hidden, bf16, threads);
        code |= project(h, t[W_UP], t[B_UP], u, inter, hidden, bf16, threads);
        for (long i = 0; i < inter; i++) {
            const float s = g[i] / (1.0f + expf(-g[i]));
            g[i] = bf16 ? round_bf16(round_bf16(s) * u[i]) : s * u[i];
        }
        code |= project(g, t[W_DOWN], t[B_DOWN], o, hidden, inter, bf16, threads);
        for (long i = 0; i < hidden; i++) x[i] = bf16 ? round_bf16(x[i] + o[i]) : x[i] + o[i];
    }
    if (!code) {
        rms_norm(x, final_norm, h, hidden, (float)eps, bf16);
        code = project(h, (int64_t)lm_head, 0, logits, vocab, hidden, bf16, threads);
    }
    free(buf);
    return code;
}
