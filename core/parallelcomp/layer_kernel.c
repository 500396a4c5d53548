/* A decoder layer's memory-bound steps, one pass over memory each, for bf16 models on x86-64 CPUs
 * with AVX-512 BF16 (docs/hardware.md measures them).
 *
 * Compiled on first use by layer_kernel.py (native.py) and called through ctypes.
 *
 * In eager transformers each of these steps is several whole-tensor passes: RMSNorm converts the
 * rows to fp32, squares, averages, multiplies, converts back and multiplies by the weight (five
 * to six passes, two of them over fp32 copies); SwiGLU's gate is a SiLU pass and a product pass.
 * On a small model such as SmolLM2 (hidden size 576) those passes took as long as the layer's
 * matrix products. Here each step reads its inputs once and writes its output once.
 *
 * The arithmetic is transformers' (LlamaRMSNorm, LlamaMLP), rounding included: intermediate
 * results are rounded to bf16 where the eager code stores a bf16 tensor, so outputs agree with it
 * except where a sum's order moves a rounding (tests/test_layer_kernel.py).
 *
 * pc_rms_norm: out[r] = w * bf16(x[r] / sqrt(mean(x[r]^2) + eps)), the mean over n in fp32.
 * pc_silu_mul: out = bf16(silu(g) * u), elementwise over `count` values, where silu(g) is torch's
 * own bf16 SiLU of g, read from a table of all 65,536 of them (layer_kernel._silu_table).
 * pc_rope: out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), transformers' rotary embedding
 * of one (B, H, T, D) tensor, cos and sin (B, T, D) rows shared by the heads.
 * pc_logsumexp_update: folds one vocabulary slice of bf16 logits into each row's running
 * log-sum-exp, in fp32 (nll.py: phase 2's NLL without the whole rows × vocabulary logits).
 * Threads come from OpenMP (torch's pool size is passed in, as the other kernels do).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define SPAN 4096  /* values per parallel work item of pc_silu_mul */

static inline __mmask16 tail_mask(long left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* fp32 -> bf16, rounded to nearest even as torch rounds (c10::BFloat16). VCVTNEPS2BF16 does so
 * but flushes subnormal inputs to zero; the rare vector that holds one (|x| < 2^-126) is
 * rounded in integer arithmetic instead, so subnormals survive as they do in torch. */
static inline __m256i to_bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __mmask16 subnormal = _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7F800000))
                                & _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x007FFFFF));
    if (__builtin_expect(subnormal != 0, 0)) {
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        return _mm256_mask_mov_epi16((__m256i)_mm512_cvtneps_pbh(v), subnormal,
                                     _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
    return (__m256i)_mm512_cvtneps_pbh(v);
}

static inline __m512 round_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

/* e^x to about 1 ulp of fp32: Cody-Waite reduction by ln 2, Cephes' expf polynomial on
 * [-ln2/2, ln2/2], and scalef for 2^n. x is first clamped to [-104, 89], outside which e^x is 0
 * or inf in fp32 (a NaN becomes 89; pc_logsumexp_update never passes one). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

void pc_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, long rows, long n, float eps, long threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= 16384)
    for (long r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * n;
        uint16_t *o = out + r * n;
        __m512 sum = _mm512_setzero_ps();
        for (long i = 0; i < n; i += 16) {
            const __m512 v = load_bf16(xr + i, tail_mask(n - i));
            sum = _mm512_fmadd_ps(v, v, sum);
        }
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sum) / (float)n + eps));
        for (long i = 0; i < n; i += 16) {
            const __mmask16 m = tail_mask(n - i);
            const __m512 y = round_bf16(_mm512_mul_ps(load_bf16(xr + i, m), scale));
            _mm256_mask_storeu_epi16(o + i, m, to_bf16(_mm512_mul_ps(y, load_bf16(w + i, m))));
        }
    }
}

/* A bf16 SiLU depends only on its input's 16 bits, so it is looked up: `table` holds, for each
 * bit pattern, the fp32 bits of torch's bf16 result. One gather of 16 values replaces an exp and a
 * division per value (the division alone took as long as the memory traffic), and the result is
 * eager torch's by construction, whatever exp that torch build uses. */
void pc_silu_mul(const uint16_t *g, const uint16_t *u, uint16_t *out, long count, const int32_t *table,
                 long threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (count >= 16384)
    for (long s = 0; s < count; s += SPAN) {
        const long end = s + SPAN < count ? s + SPAN : count;
        for (long i = s; i < end; i += 16) {
            const __mmask16 m = tail_mask(end - i);
            const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, g + i));
            const __m512 silu = _mm512_castsi512_ps(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, bits, table, 4));
            _mm256_mask_storeu_epi16(out + i, m, to_bf16(_mm512_mul_ps(silu, load_bf16(u + i, m))));
        }
    }
}

/* The online softmax normalizer (Milakov & Gimelshein, arXiv 1805.02867) over slices of each row:
 * on entry (high[r], total[r]) describe the values seen so far as high + log(total) (-inf and 0
 * before the first slice); row r's `cols` bf16 values at x + r * stride are folded in, in fp32.
 * Two passes over the slice (its maximum, then the sum of e^(x - max)); the second reads it from
 * L1. A NaN logit leaves the row NaN from then on, as torch.logsumexp gives NaN. */
void pc_logsumexp_update(const uint16_t *x, long rows, long cols, long stride, float *high, float *total,
                         long threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= 16384)
    for (long r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * stride;
        __m512 top = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (long i = 0; i < cols; i += 16) {
            const __mmask16 m = tail_mask(cols - i);
            const __m512 v = load_bf16(xr + i, m);
            nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
            top = _mm512_mask_max_ps(top, m, top, v);
        }
        const float before = high[r];
        if (nan || isnan(before)) {
            high[r] = total[r] = NAN;
            continue;
        }
        const float now = fmaxf(before, _mm512_reduce_max_ps(top));
        if (now == -INFINITY) continue;  /* nothing but -inf so far: the row stays (-inf, 0) */
        const __m512 shift = _mm512_set1_ps(now);
        __m512 sum = _mm512_setzero_ps();
        for (long i = 0; i < cols; i += 16) {
            const __mmask16 m = tail_mask(cols - i);
            sum = _mm512_mask_add_ps(sum, m, sum, exp16(_mm512_sub_ps(load_bf16(xr + i, m), shift)));
        }
        const float carried = before == -INFINITY ? 0.0f : total[r] * expf(before - now);
        total[r] = carried + _mm512_reduce_add_ps(sum);
        high[r] = now;
    }
}

/* Rows of x and out at b * sb + h * sh + t * st (the same strides: out is empty_like(x)), rows of
 * cos and sin at b * cb + t * ct (cb = 0 broadcasts one batch row). rotate_half(x) is
 * (-x[D/2:], x[:D/2]); D is a multiple of 32, so each half is whole vectors. Rounded where the eager
 * code stores a bf16 tensor: both products, then their sum. */
void pc_rope(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out, long B, long H, long T,
             long D, long sb, long sh, long st, long cb, long ct, long threads) {
    const long half = D / 2, rows = B * T * H;
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * D >= 16384)
    for (long r = 0; r < rows; r++) {
        const long b = r / (T * H), t = (r / H) % T, h = r % H;
        const long at = b * sb + h * sh + t * st, angle = b * cb + t * ct;
        for (long i = 0; i < D; i += 16) {
            __m512 rotated = load_bf16(x + at + (i < half ? i + half : i - half), 0xFFFF);
            if (i < half)
                rotated = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(rotated), sign));
            const __m512 a = round_bf16(_mm512_mul_ps(load_bf16(x + at + i, 0xFFFF), load_bf16(cos + angle + i, 0xFFFF)));
            const __m512 c = round_bf16(_mm512_mul_ps(rotated, load_bf16(sin + angle + i, 0xFFFF)));
            _mm256_storeu_si256((__m256i *)(out + at + i), to_bf16(_mm512_add_ps(a, c)));
        }
    }
}
