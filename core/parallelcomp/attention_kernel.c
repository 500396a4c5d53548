/* Softmax attention on Intel AMX tiles (bf16 products, fp32 accumulation): phase 1's causal
 * attention and phase 2's packed question rows on CPUs with AMX (docs/hardware.md measures it).
 * Built with -DPC_NO_AMX, the same kernel computes the tile products with AVX-512 BF16
 * instructions instead, for CPUs without AMX, and leaves out the linear layer (attention_kernel.py's
 * BUILDS).
 *
 * Compiled on first use by attention_kernel.py (native.py) and called through ctypes.
 *
 * pc_amx_attention: out[b, h, m] = softmax(scale * q[b, h, m] . K_b[h / G]^T) V_b[h / G], for
 * every key or, causal, for keys t <= T_b - M + m (the bottom-right aligned mask of a query block
 * at the end of its keys). Each batch entry reads keys and values of its own length from where
 * they are (phase 2: each row's chunk in the store), so one call serves a whole micro-batch, and
 * may have a second, short run of keys behind them under a causal mask of its own (phase 2: the
 * prefix, the question head and the question's own keys), attended in the same online softmax.
 * FlashAttention's loop (Dao et al. 2022, Alg. 1), one block of QB query rows against KB keys at
 * a time (in phase 1 two blocks side by side): the scores are four 16x16 tile products,
 * the online softmax runs on AVX-512 registers, and the probabilities (rounded to bf16, as torch's
 * fused kernel does) times the values are four more tile products accumulated into the output.
 *
 * Two things make it faster than torch's fused CPU kernel here (docs/hardware.md):
 * - keys and values are packed once per row into the tiles' pair-interleaved ("VNNI") layout,
 *   which every query block of the head then loads row by row. Phase 2's chunks may come packed
 *   already (`tiled`: pc_amx_tile made them, and the store keeps them so, docs/store.md); the
 *   kernel then packs only the short run behind them and requests each KV head's chunk from
 *   memory while it attends the head before, so those reads overlap the arithmetic; and where a
 *   thread takes whole rows (phase 2) it attends up to NQ query blocks of the head against each
 *   key block in turn, so a key block read from memory serves them all from the core's cache;
 * - a row's running maximum moves only when a score exceeds it by more than LAZY (in log2 units),
 *   so the common block needs no horizontal maximum, no rescaling of the output and no scalar
 *   exp; the probabilities are then at most 2^LAZY before normalisation, which fp32 and bf16
 *   hold exactly as well as values at most 1 (the same exponent range, the same mantissa).
 *
 * Tiles hold 16 rows of 64 bytes; tile registers 0-3 accumulate, 4-6 hold operands. Threads come
 * from OpenMP (torch's pool, as decode_kernel.c); each configures its tiles and releases them.
 * Linux hands AMX state to a process only on request (pc_amx_init).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KB 64  /* keys per block: four 16-key score tiles */
#define QB 16  /* query rows per block: one tile's rows */
#define LAZY 8.0f  /* log2 of the largest unnormalised probability (see the online softmax) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#ifndef PC_NO_AMX
typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Asks Linux for the AMX tile state (XTILEDATA) for this process: 0 when granted. */
int pc_amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? 1 : 0; }

/* Eight tiles of 16 rows of 64 bytes, as a constant rather than a local: GCC 12's _tile_loadconfig
 * declares its operand as an 8-byte memory input, so the compiler may drop stores to bytes 8-63
 * of a local configuration as dead. It did here once a new local took part of that stack slot, and
 * LDTILECFG then faulted on rows of 0. A constant is never stored to, so nothing can be dropped. */
static const TileConfig TILES __attribute__((aligned(64))) = {
    .palette = 1, .colsb = {64, 64, 64, 64, 64, 64, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 16, 16}};

static void configure(void) { _tile_loadconfig(&TILES); }
#else  /* the AVX-512 BF16 build: no tile state to ask for, configure or release */
int pc_amx_init(void) { return 0; }
static void configure(void) {}
#define _tile_release() ((void)0)
#endif

/* 2^t for finite t (underflows to 0 below -150): f = t - floor(t) in one VREDUCEPS, a degree-4
 * polynomial of 2^f on [0, 1) (relative error 2.7e-6, far below the bf16 rounding the
 * probabilities get; least squares on the relative error, refined to near-minimax), and scalef,
 * which multiplies by 2^floor(t). */
static inline __m512 exp2_16(__m512 t) {
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 y = _mm512_set1_ps(1.3520609479e-2f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.2037416819e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4142750009e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9300661952e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0000025182e+0f));
    return _mm512_scalef_ps(y, t);
}

/* K rows (T, D) → [Tp/16 groups][D/2 pairs][16 keys] of bf16 pairs (the B layout of q·kᵀ). */
static void pack_keys(const uint16_t *k, long ks, long T, long D, long g, uint32_t *dst) {
    const long P = D / 2, t0 = g * 16;
    uint32_t *o = dst + g * P * 16;
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)ks));
    /* the keys of this group that exist: none in the groups that pad T to a whole block */
    const __mmask16 live = T - t0 >= 16 ? 0xFFFF : T <= t0 ? 0 : (__mmask16)((1u << (T - t0)) - 1);
    if (t0 + 32 <= T)  /* the next group's rows: gathers defeat the hardware's prefetch from memory */
        for (long n = 16; n < 32; n++)
            for (long x = 0; x < 2 * D; x += 64) _mm_prefetch((const char *)(k + (t0 + n) * ks) + x, _MM_HINT_T0);
    for (long p = 0; p < P; p++)
        _mm512_store_si512((__m512i *)(o + p * 16),
                           _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx, k + t0 * ks + 2 * p, 2));
}

/* V rows (T, Dv) → [Tp/32][Dv/16][16 key pairs][16 columns][2] (the B layout of p·v). */
static void pack_values(const uint16_t *v, long vs, long T, long Dv, long g, uint16_t *dst) {
    const long C = Dv / 16;
    __m512i lo, hi;
    {
        short a[32], b[32];
        for (int j = 0; j < 16; j++) { a[2 * j] = j; a[2 * j + 1] = 32 + j; b[2 * j] = 16 + j; b[2 * j + 1] = 48 + j; }
        lo = _mm512_loadu_si512(a);
        hi = _mm512_loadu_si512(b);
    }
    for (long p = 0; p < 16; p++) {
        const long t0 = g * 32 + 2 * p, t1 = t0 + 1;
        for (long c = 0; c < C; c += 2) {
            const __m512i a = t0 < T ? _mm512_loadu_si512(v + t0 * vs + 16 * c) : _mm512_setzero_si512();
            const __m512i b = t1 < T ? _mm512_loadu_si512(v + t1 * vs + 16 * c) : _mm512_setzero_si512();
            _mm512_store_si512((__m512i *)(dst + ((g * C + c) * 16 + p) * 32), _mm512_permutex2var_epi16(a, lo, b));
            _mm512_store_si512((__m512i *)(dst + ((g * C + c + 1) * 16 + p) * 32), _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/* r[i][j] → r[j][i] for a 16 x 16 block of 32-bit elements, in four rounds of shuffles. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* Keys rounded up to whole blocks. */
static long whole(long T) { return (T + KB - 1) / KB * KB; }

/* The bf16 elements of one row's packed keys and values: its keys, then its tail's, each in whole blocks. */
static long packed_size(long Hkv, long T, long T2, long D, long Dv) { return Hkv * (whole(T) + whole(T2)) * (D + Dv); }

#define ROW 14  /* longs per batch entry of `kv` (pc_amx_attention): the keys' 7, then the tail's */

/* A call's shapes and tensors. */
typedef struct {
    const uint16_t *q;
    uint16_t *out;
    float *lse;
    long H, Hkv, M, D, Dv, qs_b, qs_h, qs_m, os_b, os_h, os_m, period, qblocks;
    int causal;
    float scale;
} Call;

/* One batch entry: its key counts and where its keys and values are packed, per KV head: its own
 * keys at kc + h·kch and vc + h·vch (packed here, or already packed: `tiled`), its tail's at
 * kt + h·whole(T2)·D/2 and vt + h·whole(T2)·Dv (packed here). */
typedef struct {
    long b, T, T2, Tp, Ta, kgroups, shift, kch, vch;
    uint32_t *kc, *kt;
    uint16_t *vc, *vt;
} Row;

/* The packed keys and values of the KV head a thread attends next, requested from memory a few
 * cache lines at a time between the vector work of the head before, so that the reads overlap
 * the arithmetic (phase 2 over tiled chunks reads each chunk's KV from memory once per question). */
typedef struct {
    const char *k, *v;
    long kbytes, vbytes, next, quota;  /* bytes from k and v, the next offset, lines per call */
} Prefetch;

#define NQ 4  /* query blocks of one KV head that share each key block while it is in the core's cache */

/* One block of query rows: its queries and running softmax. */
typedef struct {
    uint16_t qbuf[QB * 256] __attribute__((aligned(64)));
    float obuf[QB * 256] __attribute__((aligned(64)));
    float lsum[QB * 16] __attribute__((aligned(64)));
    float mx[QB];
    long h, m0, rows, blocks, lo_lim;
} Block;

/* A thread's buffers for NQ blocks of query rows. */
typedef struct {
    Prefetch pf;
    uint16_t pbuf[2][QB * KB] __attribute__((aligned(64)));
    float sbuf[2][QB * KB] __attribute__((aligned(64)));
    Block blk[NQ];
} Scratch;

/* Batch entry b, packed at `at` (its tail only where `tiled`: its own keys are packed already). */
static Row row_at(const Call *c, const long *kv, long b, uint16_t *at, int tiled) {
    const long *e = kv + ROW * b, T = e[6], Tp = whole(T), T2 = e[13], Ta = Tp + whole(T2), Hkv = c->Hkv;
    Row r = {b, T, T2, Tp, Ta, Ta / 16, c->causal ? T - c->M : -1, Tp * c->D / 2, Tp * c->Dv, 0, 0, 0, 0};
    if (tiled) {
        r.kc = (uint32_t *)e[0];
        r.kch = e[1] / 2;
        r.vc = (uint16_t *)e[3];
        r.vch = e[4];
    } else {
        r.kc = (uint32_t *)at;
        at += Hkv * Tp * c->D;
        r.vc = at;
        at += Hkv * Tp * c->Dv;
    }
    r.kt = (uint32_t *)at;
    r.vt = at + Hkv * whole(T2) * c->D;
    return r;
}

/* Packs key group i of the row's heads (and, for even groups, the 32 values from there): the
 * tail's keys from block Tp / KB on. */
static void pack_group(const Call *c, const Row *w, const long *kv, long i) {
    const long P = c->D / 2, h = i / w->kgroups, g = i % w->kgroups, tail = g >= w->Tp / 16, gs = tail ? g - w->Tp / 16 : g;
    const long *s = kv + ROW * w->b + (tail ? 7 : 0);
    uint32_t *kd = tail ? w->kt + h * whole(w->T2) * P : w->kc + h * w->kch;
    uint16_t *vd = tail ? w->vt + h * whole(w->T2) * c->Dv : w->vc + h * w->vch;
    pack_keys((const uint16_t *)s[0] + h * s[1], s[2], s[6], c->D, gs, kd);
    if (gs % 2 == 0) pack_values((const uint16_t *)s[3] + h * s[4], s[5], s[6], c->Dv, gs / 2, vd);
}

/* Requests the next few lines of z->pf's head (prefetch_head) into the caches. */
static inline void prefetch_lines(Prefetch *p) {
    for (long n = 0; n < p->quota && p->next < p->kbytes; n++, p->next += 64) {
        _mm_prefetch(p->k + p->next, _MM_HINT_T0);
        if (p->next < p->vbytes) _mm_prefetch(p->v + p->next, _MM_HINT_T0);
    }
}

/* Aims p at the packed keys and values of KV head hk of row w (none: w NULL), to be requested
 * over `calls` calls of prefetch_lines. */
static void prefetch_head(const Call *c, const Row *w, long hk, long calls, Prefetch *p) {
    p->kbytes = p->vbytes = p->next = 0;
    if (w == NULL) return;
    p->k = (const char *)(w->kc + hk * w->kch);
    p->v = (const char *)(w->vc + hk * w->vch);
    p->kbytes = 2 * w->Tp * c->D;
    p->vbytes = 2 * w->Tp * c->Dv;
    p->quota = (p->kbytes / 64 + calls - 1) / calls;
}

#ifndef PC_NO_AMX
/* The scores of query block `s` against key block kk (keys at kh): four 16 x 16 tiles, each summed
 * over the head dimension 32 at a time, stored to sbuf (QB rows of KB). */
static inline void block_scores(const Call *c, const Block *s, long kk, const uint32_t *kh, float *sbuf) {
    const long D = c->D, P = D / 2;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (long d = 0; d < D / 32; d++) {
        _tile_loadd(4, s->qbuf + 32 * d, 2 * D);
        const uint32_t *kt = kh + (kk * 4 * P + 16 * d) * 16;
        _tile_loadd(5, kt, 64); _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, kt + P * 16, 64); _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, kt + 2 * P * 16, 64); _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, kt + 3 * P * 16, 64); _tile_dpbf16ps(3, 4, 6);
    }
    _tile_stored(0, sbuf, 4 * KB); _tile_stored(1, sbuf + 16, 4 * KB);
    _tile_stored(2, sbuf + 32, 4 * KB); _tile_stored(3, sbuf + 48, 4 * KB);
}

/* The scores of two query blocks against key block kk, as block_scores computes each (the same
 * sums in the same order), two key tiles at a time: each key tile is loaded once for both blocks. */
static inline void pair_scores(const Call *c, const Block *s0, const Block *s1, long kk, const uint32_t *kh,
                               float *sbuf0, float *sbuf1) {
    const long D = c->D, P = D / 2;
    for (long t = 0; t < 4; t += 2) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (long d = 0; d < D / 32; d++) {
            const uint32_t *kt = kh + (kk * 4 * P + t * P + 16 * d) * 16;
            _tile_loadd(4, s0->qbuf + 32 * d, 2 * D);
            _tile_loadd(6, kt, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, s1->qbuf + 32 * d, 2 * D);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(7, kt + P * 16, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, sbuf0 + 16 * t, 4 * KB); _tile_stored(2, sbuf0 + 16 * t + 16, 4 * KB);
        _tile_stored(1, sbuf1 + 16 * t, 4 * KB); _tile_stored(3, sbuf1 + 16 * t + 16, 4 * KB);
    }
}

/* Query block `s`'s output plus its probabilities (pbuf) times key block kk's values (vh). */
static inline void block_values(const Call *c, Block *s, long kk, const uint16_t *vh, const uint16_t *pbuf) {
    const long Dv = c->Dv, C = Dv / 16;
    float *obuf = s->obuf;
    for (long c0 = 0; c0 < C; c0 += 4) {
        float *o = obuf + 16 * c0;
        _tile_loadd(0, o, 4 * Dv); _tile_loadd(1, o + 16, 4 * Dv);
        _tile_loadd(2, o + 32, 4 * Dv); _tile_loadd(3, o + 48, 4 * Dv);
        for (long half = 0; half < 2; half++) {
            _tile_loadd(4, pbuf + 32 * half, 2 * KB);
            const uint16_t *vt = vh + ((kk * 2 + half) * C + c0) * 512;
            _tile_loadd(5, vt, 64); _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, vt + 512, 64); _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(5, vt + 1024, 64); _tile_dpbf16ps(2, 4, 5);
            _tile_loadd(6, vt + 1536, 64); _tile_dpbf16ps(3, 4, 6);
        }
        _tile_stored(0, o, 4 * Dv); _tile_stored(1, o + 16, 4 * Dv);
        _tile_stored(2, o + 32, 4 * Dv); _tile_stored(3, o + 48, 4 * Dv);
    }
}

/* block_values for two query blocks, two column tiles at a time: each value tile is loaded once
 * for both (each output tile gets the same products in the same order). */
static inline void pair_values(const Call *c, Block *s0, Block *s1, long kk, const uint16_t *vh,
                               const uint16_t *pbuf0, const uint16_t *pbuf1) {
    const long Dv = c->Dv, C = Dv / 16;
    for (long c0 = 0; c0 < C; c0 += 2) {
        float *o0 = s0->obuf + 16 * c0, *o1 = s1->obuf + 16 * c0;
        _tile_loadd(0, o0, 4 * Dv); _tile_loadd(1, o1, 4 * Dv);
        _tile_loadd(2, o0 + 16, 4 * Dv); _tile_loadd(3, o1 + 16, 4 * Dv);
        for (long half = 0; half < 2; half++) {
            const uint16_t *vt = vh + ((kk * 2 + half) * C + c0) * 512;
            _tile_loadd(4, pbuf0 + 32 * half, 2 * KB);
            _tile_loadd(6, vt, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, pbuf1 + 32 * half, 2 * KB);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(7, vt + 512, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, o0, 4 * Dv); _tile_stored(1, o1, 4 * Dv);
        _tile_stored(2, o0 + 16, 4 * Dv); _tile_stored(3, o1 + 16, 4 * Dv);
    }
}

#else
/* The same products on AVX-512 BF16 registers (VDPBF16PS: per fp32 lane, the two products of a
 * pair of bf16 added to the sum), reading the same packed layouts: pair p of a key group is one
 * register of 16 keys' pairs, key pair p of a value group one register of 16 columns' pairs, and
 * a query's pair (or a probability row's) is broadcast against it. RB rows × four registers at a
 * time: 4·RB sums in registers, 4 loads and RB broadcasts per 4·RB products. */
#define RB 4

static inline void block_scores(const Call *c, const Block *s, long kk, const uint32_t *kh, float *sbuf) {
    const long P = c->D / 2;
    const uint32_t *kt = kh + kk * 4 * P * 16, *q = (const uint32_t *)s->qbuf;
    for (long r0 = 0; r0 < QB; r0 += RB) {
        __m512 acc[RB][4];
        for (int i = 0; i < RB; i++)
            for (int t = 0; t < 4; t++) acc[i][t] = _mm512_setzero_ps();
        for (long p = 0; p < P; p++) {
            __m512bh k[4];
            for (int t = 0; t < 4; t++) k[t] = (__m512bh)_mm512_loadu_si512(kt + (t * P + p) * 16);
            for (int i = 0; i < RB; i++) {
                const __m512bh x = (__m512bh)_mm512_set1_epi32((int)q[(r0 + i) * P + p]);
                for (int t = 0; t < 4; t++) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], x, k[t]);
            }
        }
        for (int i = 0; i < RB; i++)
            for (int t = 0; t < 4; t++) _mm512_store_ps(sbuf + (r0 + i) * KB + 16 * t, acc[i][t]);
    }
}

static inline void pair_scores(const Call *c, const Block *s0, const Block *s1, long kk, const uint32_t *kh,
                               float *sbuf0, float *sbuf1) {
    block_scores(c, s0, kk, kh, sbuf0);
    block_scores(c, s1, kk, kh, sbuf1);
}

static inline void block_values(const Call *c, Block *s, long kk, const uint16_t *vh, const uint16_t *pbuf) {
    const long Dv = c->Dv, C = Dv / 16;
    const uint32_t *pr = (const uint32_t *)pbuf;
    for (long r0 = 0; r0 < QB; r0 += RB)
        for (long c0 = 0; c0 < C; c0 += 4) {
            __m512 acc[RB][4];
            for (int i = 0; i < RB; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_load_ps(s->obuf + (r0 + i) * Dv + 16 * (c0 + j));
            for (long half = 0; half < 2; half++) {
                const uint16_t *vt = vh + ((kk * 2 + half) * C + c0) * 512;
                for (long p = 0; p < 16; p++) {
                    __m512bh v[4];
                    for (int j = 0; j < 4; j++) v[j] = (__m512bh)_mm512_loadu_si512(vt + j * 512 + p * 32);
                    for (int i = 0; i < RB; i++) {
                        const __m512bh x = (__m512bh)_mm512_set1_epi32((int)pr[(r0 + i) * KB / 2 + 16 * half + p]);
                        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], x, v[j]);
                    }
                }
            }
            for (int i = 0; i < RB; i++)
                for (int j = 0; j < 4; j++) _mm512_store_ps(s->obuf + (r0 + i) * Dv + 16 * (c0 + j), acc[i][j]);
        }
}

static inline void pair_values(const Call *c, Block *s0, Block *s1, long kk, const uint16_t *vh,
                               const uint16_t *pbuf0, const uint16_t *pbuf1) {
    block_values(c, s0, kk, vh, pbuf0);
    block_values(c, s1, kk, vh, pbuf1);
}
#endif

/* Query block `s`'s online softmax over key block kb's scores (sbuf): its running maxima, sums and
 * (rescaled) output, and the block's probabilities in bf16 (pbuf). */
static inline void block_softmax(const Call *c, const Row *w, Block *s, long kb, const float *sbuf, uint16_t *pbuf,
                                 Prefetch *pf) {
    const long Dv = c->Dv, C = Dv / 16, period = c->period;
    const long T = w->T, T2 = w->T2, Tp = w->Tp, shift = w->shift, m0 = s->m0, rows = s->rows;
    const float scale = c->scale;
    float *obuf = s->obuf, *lsum = s->lsum, *mx = s->mx;
    const __m512 sc = _mm512_set1_ps(scale * 1.44269504088896341f), ninf = _mm512_set1_ps(-INFINITY);
    /* the block's scores, in log2 units: x = s·scale·log2(e). Online softmax with a lazy
     * maximum: a row's running maximum moves (and its sum and output are rescaled) only
     * when a score exceeds it by more than LAZY, so p = 2^(x - max) <= 2^LAZY. */
    /* A block every row sees whole (with a positive scale) keeps its raw scores s: the
     * maximum of s·scale is scale times the maximum of s, and x - max is one FMA. */
    const int full = kb * KB + KB - 1 <= s->lo_lim && scale > 0;  /* never in the tail */
    for (long r = 0; r < QB; r++) {
        prefetch_lines(pf);  /* QB calls per block, between the vector work */
        __m512 x[4], top;
        __mmask16 mk[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
        if (full) {
            for (int c = 0; c < 4; c++) x[c] = _mm512_load_ps(sbuf + r * KB + 16 * c);
            top = _mm512_mul_ps(_mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3])), sc);
        } else {
            long lim = shift >= 0 && r < rows ? shift + m0 + r : T - 1;  /* last key this row sees */
            if (lim > T - 1) lim = T - 1;
            if (kb * KB >= Tp)  /* the tail: keys Tp + s, s <= T2 - period + m % period */
                lim = Tp + T2 - period + (r < rows ? (m0 + r) % period : period - 1);
            long n = lim - kb * KB + 1;
            n = n < 0 ? 0 : n > KB ? KB : n;
            for (int c = 0; c < 4; c++) {
                const long left = n - 16 * c;
                mk[c] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
                x[c] = _mm512_mask_mul_ps(ninf, mk[c], _mm512_load_ps(sbuf + r * KB + 16 * c), sc);
            }
            top = _mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3]));
        }
        if (_mm512_cmp_ps_mask(top, _mm512_set1_ps(mx[r] + LAZY), _CMP_GT_OQ)) {
            const float mnew = _mm512_reduce_max_ps(top);
            if (mx[r] != -INFINITY) {
                const __m512 a = _mm512_set1_ps(exp2f(mx[r] - mnew));
                for (long c = 0; c < C; c++)
                    _mm512_store_ps(obuf + r * Dv + 16 * c, _mm512_mul_ps(_mm512_load_ps(obuf + r * Dv + 16 * c), a));
                _mm512_store_ps(lsum + 16 * r, _mm512_mul_ps(_mm512_load_ps(lsum + 16 * r), a));
            }
            mx[r] = mnew;
        }
        const __m512 mm = _mm512_set1_ps(mx[r]);
        __m512 acc = _mm512_load_ps(lsum + 16 * r);
        for (int c = 0; c < 4; c += 2) {
            __m512 p0, p1;
            if (full) {
                p0 = exp2_16(_mm512_fmsub_ps(x[c], sc, mm));
                p1 = exp2_16(_mm512_fmsub_ps(x[c + 1], sc, mm));
            } else {  /* hidden keys: x = -inf, whose reduction is NaN */
                p0 = _mm512_maskz_mov_ps(mk[c], exp2_16(_mm512_sub_ps(x[c], mm)));
                p1 = _mm512_maskz_mov_ps(mk[c + 1], exp2_16(_mm512_sub_ps(x[c + 1], mm)));
            }
            acc = _mm512_add_ps(acc, _mm512_add_ps(p0, p1));
            _mm512_store_si512((__m512i *)(pbuf + r * KB + 16 * c), (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        _mm512_store_ps(lsum + 16 * r, acc);
    }
}

/* Items it0 ... it0 + group - 1 of a row (group <= NQ, one KV head): a head's block of QB query
 * rows each, over all the keys they see. Each key block is loaded once for the group's query
 * blocks, which then read it from the core's cache; each block's arithmetic is the same, in the
 * same order, as on its own. Causal calls (phase 1) attend two blocks at a time where both see the
 * key block, in a 2 x 2 tile blocking (pair_scores, pair_values: each key and value tile loaded
 * once for both): a phase-1 call took 74.6-80.0 against 81.4-83.0 ms (docs/hardware.md). Phase 2
 * reads its chunks from memory, and there the pairs were slower (228.6 against 216.7 ms in a probe), so
 * it attends block by block. */
static void attend_items(const Call *c, const Row *w, long it0, long group, Scratch *z) {
    const long H = c->H, M = c->M, D = c->D, Dv = c->Dv, P = D / 2, G = H / c->Hkv, C = Dv / 16, qblocks = c->qblocks;
    const long T = w->T, T2 = w->T2, Tp = w->Tp, Ta = w->Ta, shift = w->shift, hk = it0 / qblocks / G;
    const uint32_t *kc = w->kc + hk * w->kch, *kt2 = w->kt + hk * whole(T2) * P;
    const uint16_t *vc = w->vc + hk * w->vch, *vt2 = w->vt + hk * whole(T2) * Dv;
    long blocks = 0;  /* key blocks, the most any of the group sees */
    for (long j = 0; j < group; j++) {
        Block *s = &z->blk[j];
        const long it = it0 + j;
        /* causal: the longest query blocks first, so that the dynamic schedule ends balanced */
        s->m0 = (c->causal ? qblocks - 1 - it % qblocks : it % qblocks) * QB;
        s->h = it / qblocks;
        s->rows = M - s->m0 < QB ? M - s->m0 : QB;
        for (long r = 0; r < QB; r++) {
            if (r < s->rows) memcpy(s->qbuf + r * D, c->q + w->b * c->qs_b + s->h * c->qs_h + (s->m0 + r) * c->qs_m, 2 * D);
            else memset(s->qbuf + r * D, 0, 2 * D);
            s->mx[r] = -INFINITY;
            _mm512_store_ps(s->lsum + 16 * r, _mm512_setzero_ps());
        }
        memset(s->obuf, 0, sizeof(float) * QB * Dv);
        const long last = shift >= 0 && shift + s->m0 + s->rows - 1 < T - 1 ? shift + s->m0 + s->rows - 1 : T - 1;
        s->blocks = T2 ? Ta / KB : last / KB + 1;
        s->lo_lim = shift >= 0 && shift + s->m0 < T - 1 ? shift + s->m0 : T - 1;  /* fewest keys a row sees */
        blocks = s->blocks > blocks ? s->blocks : blocks;
    }
    for (long kb = 0; kb < blocks; kb++) {
        /* the row's own keys, then its tail's */
        const long own = kb < Tp / KB, kk = own ? kb : kb - Tp / KB;
        const uint32_t *kh = own ? kc : kt2;
        const uint16_t *vh = own ? vc : vt2;
        for (long j = 0; j < group; j++) {
            Block *s = &z->blk[j];
            if (kb >= s->blocks) continue;
            if (c->causal && j + 1 < group && kb < z->blk[j + 1].blocks) {  /* two blocks share the key and value tiles */
                Block *t = s + 1;
                pair_scores(c, s, t, kk, kh, z->sbuf[0], z->sbuf[1]);
                block_softmax(c, w, s, kb, z->sbuf[0], z->pbuf[0], &z->pf);
                block_softmax(c, w, t, kb, z->sbuf[1], z->pbuf[1], &z->pf);
                pair_values(c, s, t, kk, vh, z->pbuf[0], z->pbuf[1]);
                j++;
            } else {
                block_scores(c, s, kk, kh, z->sbuf[0]);
                block_softmax(c, w, s, kb, z->sbuf[0], z->pbuf[0], &z->pf);
                block_values(c, s, kk, vh, z->pbuf[0]);
            }
        }
    }
    for (long j = 0; j < group; j++) {
        const Block *s = &z->blk[j];
        for (long r = 0; r < s->rows; r++) {
            const float sum = _mm512_reduce_add_ps(_mm512_load_ps(s->lsum + 16 * r));
            const __m512 inv = _mm512_set1_ps(1.0f / sum);
            uint16_t *dst = c->out + w->b * c->os_b + s->h * c->os_h + (s->m0 + r) * c->os_m;
            for (long k = 0; k < C; k++) {
                const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(s->obuf + r * Dv + 16 * k), inv));
                _mm256_storeu_si256((__m256i *)(dst + 16 * k), (__m256i)y);
            }
            c->lse[(w->b * H + s->h) * M + s->m0 + r] = (s->mx[r] + log2f(sum)) * 0.69314718055994531f;
        }
    }
}

/* Whole rows per thread (phase 2's many short rows: one thread packs its row while the other
 * attends, so the packing's memory reads overlap the arithmetic), else each row's items shared. */
static int by_rows(int causal, long B, long threads) { return !causal && B >= 4 * threads; }

/* The bf16 elements a row needs packed here: its keys and values and its tail's, or with `tiled`
 * its tail's alone. */
static long own_size(const long *kv, long b, long Hkv, long D, long Dv, int tiled) {
    const long T = kv[ROW * b + 6], T2 = kv[ROW * b + 13];
    return packed_size(Hkv, tiled ? 0 : T, T2, D, Dv);
}

/* out[b, h, m] = softmax(scale · q[b, h, m]·K_b[h / (H/Hkv)]ᵀ) V_b over the keys row m sees: every
 * key, or with `causal` keys t <= T_b - M + m (a block of queries at the end of its keys).
 * Each batch entry b has keys and values of its own, T_b of them, and a tail of T2_b more (0: none)
 * that row m sees up to key T2_b - period + m % period (rows packed as G·q query rows of q tokens,
 * period = q, see the tokens before theirs and their own); `kv` row b (ROW longs) says: {key
 * address, key head stride, key row stride, value address, value head stride, value row stride,
 * T_b}, then the same 7 of the tail (strides in elements). With `tiled` (not causal) each entry's
 * own keys and values are already in the tiles' layout (attention_kernel.py's `tile`: whole(T_b)
 * rows per head, zero past T_b, at the given head strides; the row strides are not read), so only
 * the tails are packed here, and each KV head's are requested from memory while the head before is
 * attended. bf16 in and out, fp32 accumulation; lse (B, H, M) fp32. Returns 0, or 1 on shapes
 * (causal with T_b < M, with a tail or tiled; a tail shorter than period). */
int pc_amx_attention(const uint16_t *q, const long *kv, uint16_t *out, float *lse,
                     long B, long H, long Hkv, long M, long D, long Dv,
                     long qs_b, long qs_h, long qs_m, long os_b, long os_h, long os_m,
                     int causal, long period, float scale, int tiled, long threads, void *work) {
    if (D % 32 || D > 256 || Dv % 64 || Dv > 256 || H % Hkv || M < 1 || B < 1 || (causal && tiled)) return 1;
    long most = 0;  /* the largest row's keys and values packed here, in bf16 elements */
    for (long b = 0; b < B; b++) {
        const long T = kv[ROW * b + 6], T2 = kv[ROW * b + 13];
        if (T < 1 || (causal && (T < M || T2)) || T2 < 0 || (T2 && (period < 1 || T2 < period))) return 1;
        most = own_size(kv, b, Hkv, D, Dv, tiled) > most ? own_size(kv, b, Hkv, D, Dv, tiled) : most;
    }
    const Call c = {q, out, lse, H, Hkv, M, D, Dv, qs_b, qs_h, qs_m, os_b, os_h, os_m, period, (M + QB - 1) / QB, causal, scale};
    const long items = H * c.qblocks, per_head = items / Hkv;
#pragma omp parallel num_threads(threads)
    {
        configure();
        Scratch z;
        z.pf.kbytes = z.pf.vbytes = z.pf.next = 0;
        if (by_rows(causal, B, threads)) {
            /* rows t, t + n, ... of the n threads, one KV head after another (with `tiled`, the next
             * head's keys and values, this row's or the thread's next row's first, come in meanwhile) */
            const long t = omp_get_thread_num(), n = omp_get_num_threads();
            uint16_t *mine = (uint16_t *)work + t * most;
            for (long b = t; b < B; b += n) {
                const Row w = row_at(&c, kv, b, mine, tiled);
                for (long i = 0; i < Hkv * w.kgroups; i++)
                    if (!tiled || i % w.kgroups >= w.Tp / 16) pack_group(&c, &w, kv, i);
                for (long hk = 0; hk < Hkv; hk++) {
                    if (tiled) {
                        const Row next = b + n < B ? row_at(&c, kv, b + n, mine, tiled) : w;
                        prefetch_head(&c, hk + 1 < Hkv ? &w : b + n < B ? &next : NULL, (hk + 1) % Hkv,
                                      per_head * (w.Ta / KB) * QB, &z.pf);
                    }
                    for (long it = hk * per_head; it < (hk + 1) * per_head; it += NQ)
                        attend_items(&c, &w, it, (hk + 1) * per_head - it < NQ ? (hk + 1) * per_head - it : NQ, &z);
                }
            }
        } else {
            /* Row by row, so that a row's packed keys and values stay in the cores' caches while
             * its queries read them; two buffers, so that a thread done with row b packs row b + 1
             * while the others finish row b (the packing loop's barrier keeps row b + 2 from
             * overwriting it). */
            for (long b = 0; b < B; b++) {
                const Row w = row_at(&c, kv, b, (uint16_t *)work + (b % 2) * most, tiled);
#pragma omp for schedule(static)
                for (long i = 0; i < Hkv * w.kgroups; i++)
                    if (!tiled || i % w.kgroups >= w.Tp / 16) pack_group(&c, &w, kv, i);
                const long pairs = (per_head + 1) / 2;  /* two items of one KV head at a time (attend_items) */
#pragma omp for schedule(dynamic, 1) nowait
                for (long p = 0; p < Hkv * pairs; p++) {
                    const long hk = p / pairs, it = hk * per_head + 2 * (p % pairs), end = (hk + 1) * per_head;
                    attend_items(&c, &w, it, end - it < 2 ? end - it : 2, &z);
                }
            }
        }
        _tile_release();
    }
    return 0;
}

/* The bytes of packed keys and values a pc_amx_attention call over `kv` (B rows, `tiled` or not) on
 * `threads` threads needs at `work`: a buffer of the largest row's per thread for whole rows per
 * thread, else two (one for a single row). */
long pc_amx_workspace(const long *kv, long B, long Hkv, long D, long Dv, int causal, int tiled, long threads) {
    long most = 0;
    for (long b = 0; b < B; b++) most = own_size(kv, b, Hkv, D, Dv, tiled) > most ? own_size(kv, b, Hkv, D, Dv, tiled) : most;
    return 2 * (by_rows(causal, B, threads) ? threads : B > 1 ? 2 : 1) * most;
}

/* attention_kernel.py's `tile`: one row's keys (Hkv heads at head stride kh, row stride ks) and
 * values into dk (Hkv, whole(T), D) and dv (Hkv, whole(T), Dv) in the layout pack_group writes,
 * zeros past T: what pc_amx_attention reads with `tiled`. */
void pc_amx_tile(const uint16_t *k, long kh, long ks, const uint16_t *v, long vh, long vs, long T, long Hkv,
                 long D, long Dv, uint16_t *dk, uint16_t *dv, long threads) {
    const long Tp = whole(T), groups = Tp / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < Hkv * groups; i++) {
        const long h = i / groups, g = i % groups;
        pack_keys(k + h * kh, ks, T, D, g, (uint32_t *)(dk + h * Tp * D));
        if (g % 2 == 0) pack_values(v + h * vh, vs, T, Dv, g / 2, dv + h * Tp * Dv);
    }
}

/* The inverse of pc_amx_tile: the first T keys and values of each head into k and v, (Hkv, T, D)
 * and (Hkv, T, Dv) with rows contiguous and heads kh and vh elements apart (T·D and T·Dv: the
 * whole tensors contiguous; more: a span of a longer buffer, such as the decode cache's). */
void pc_amx_untile(const uint16_t *dk, const uint16_t *dv, long T, long Hkv, long D, long Dv, uint16_t *k,
                   uint16_t *v, long kh, long vh, long threads) {
    const long Tp = whole(T), groups = Tp / 16, P = D / 2, C = Dv / 16;
    short idx[32];
    for (int j = 0; j < 16; j++) { idx[j] = 2 * j; idx[16 + j] = 2 * j + 1; }
    const __m512i odd_even = _mm512_loadu_si512(idx);  /* a pair-interleaved row → its two keys' columns */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < Hkv * groups; i++) {
        const long h = i / groups, g = i % groups, t0 = g * 16, live = T - t0 >= 16 ? 16 : T - t0;
        if (live <= 0) continue;
        const uint32_t *src = (const uint32_t *)(dk + h * Tp * D) + g * P * 16;
        uint32_t *dst = (uint32_t *)(k + h * kh + t0 * D);
        for (long c = 0; c < P; c += 16) {
            __m512i r[16];
            for (long p = 0; p < 16; p++) r[p] = _mm512_loadu_si512(src + (c + p) * 16);  /* a file's tensors: any alignment */
            transpose16(r);  /* r[n]: key t0 + n's pairs c..c + 15 */
            for (long n = 0; n < live; n++) _mm512_storeu_si512(dst + n * P + c, r[n]);
        }
        if (g % 2) continue;
        for (long p = 0; p < 16; p++)
            for (long c = 0; c < C; c++) {
                const long t = g * 16 + 2 * p;
                const __m512i pairs = _mm512_permutexvar_epi16(
                    odd_even, _mm512_loadu_si512(dv + h * Tp * Dv + ((g / 2 * C + c) * 16 + p) * 32));
                if (t < T) _mm256_storeu_si256((__m256i *)(v + h * vh + t * Dv + 16 * c), _mm512_castsi512_si256(pairs));
                if (t + 1 < T)
                    _mm256_storeu_si256((__m256i *)(v + h * vh + (t + 1) * Dv + 16 * c), _mm512_extracti64x4_epi64(pairs, 1));
            }
    }
}

#ifndef PC_NO_AMX  /* the linear layer runs on the tiles only */
/* y (M, N) = x (M, K) · w (N, K)ᵀ (+ bias (N)), bf16 in and out, fp32 sums rounded once, on the
 * tiles: two layouts, which the caller chooses (pc_amx_linear; attention_kernel.packs_weight). Both
 * add the 32-element blocks of K into one fp32 tile in order, so their outputs are the same bits
 * (tests/test_attention_kernel.py). K a multiple of 32 and N of 16 (attention_kernel.takes_linear). */

#define ROW_BLOCK 64  /* linear_many: rows of x that every column block of a thread meets in turn */

/* 16 rows of K bf16 (`live` of them real, zeros for the rest) into the tiles' pair layout, 16
 * pairs of K at a time by transposing: dst[p][i] = the pair (src[i][2p], src[i][2p + 1]), for
 * p < K / 2. linear_few packs x so (the B operand), linear_many the weight. */
static inline void pack_pairs(const uint16_t *src, long K, long live, uint32_t *dst) {
    for (long p = 0; p < K / 2; p += 16) {
        __m512i r[16];
        for (long i = 0; i < 16; i++)
            r[i] = i < live ? _mm512_loadu_si512((const uint32_t *)(src + i * K) + p) : _mm512_setzero_si512();
        transpose16(r);
        for (long i = 0; i < 16; i++) _mm512_store_si512((__m512i *)(dst + (p + i) * 16), r[i]);
    }
}

/* Few rows (the question step's 20-30): a GEMM is bound by reading its weight, and torch's bf16
 * GEMM (oneDNN) first reorders the weight into the tiles' layout, a second pass over it on every
 * call. Here the weight's rows are the tiles' A operand as they lie (16 output columns × 32 of K
 * per tile), and x, the small operand, is what gets packed: xᵀ in pairs of K per 16 rows
 * ([M/16][K/2][16] pairs, the B layout, in `packed`), once per call. Each thread takes blocks of
 * 32 output columns; a block's two weight tiles meet two 16-row blocks of x at a time, four
 * accumulators, and the 16 × 16 fp32 results (output columns × rows) are transposed into y's rows. */
static void linear_few(const uint16_t *x, long M, long K, const uint16_t *w, long N, const uint16_t *bias, uint16_t *y,
                       uint32_t *packed, long threads) {
    const long mb = (M + 15) / 16, P = K / 2, nb = (N + 31) / 32;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long b = 0; b < mb; b++) pack_pairs(x + b * 16 * K, K, M - b * 16, packed + b * P * 16);  /* xᵀ */
        configure();
        float sums[4][256] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (long j = 0; j < nb; j++) {
            const long n = j * 32;
            const int two_n = n + 32 <= N;
            for (long b = 0; b < mb; b += 2) {
                const int two_m = b + 1 < mb;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (long k = 0; k < K; k += 32) {  /* tile (i, j) accumulates weight tile i · x tile j */
                    _tile_loadd(4, w + n * K + k, K * 2);
                    _tile_loadd(6, packed + (b * P + k / 2) * 16, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (two_m) {
                        _tile_loadd(7, packed + ((b + 1) * P + k / 2) * 16, 64);
                        _tile_dpbf16ps(1, 4, 7);
                    }
                    if (two_n) {
                        _tile_loadd(5, w + (n + 16) * K + k, K * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        if (two_m) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, sums[0], 64);
                if (two_m) _tile_stored(1, sums[1], 64);
                if (two_n) _tile_stored(2, sums[2], 64);
                if (two_n && two_m) _tile_stored(3, sums[3], 64);
                for (int t = 0; t < 4; t++) {
                    const long col = n + (t >> 1) * 16, row = (b + (t & 1)) * 16;
                    if (((t >> 1) && !two_n) || ((t & 1) && !two_m)) continue;
                    __m512i r[16];
                    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512((const __m512i *)(sums[t] + i * 16));
                    transpose16(r);  /* r[i]: the 16 columns col.. of row row + i */
                    const __m512 add = bias ? _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(bias + col)))
                                            : _mm512_setzero_ps();
                    for (long i = 0; i < 16 && row + i < M; i++)
                        _mm256_storeu_si256((__m256i *)(y + (row + i) * N + col),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_castsi512_ps(r[i]), add)));
                }
            }
        }
        _tile_release();
    }
}

/* A finished 32 × 32 block of y in fp32 (`s`: four tiles, tile t the rows (t & 1)·16.. and the
 * columns (t >> 1)·16.. of the block at row, col), to be rounded into y a few rows at a time. */
typedef struct {
    long row, col;
    int two_n;  /* whether the block's second 16 columns exist */
    const float *s;
} Block32;

/* Rows e0..e1 (of 64: tile e / 16, its row e % 16) of `b`, plus the bias, rounded into y. */
static inline void store_rows(const Block32 *b, int e0, int e1, long M, long N, const uint16_t *bias, uint16_t *y) {
    for (int e = e0; e < e1; e++) {
        const int t = e >> 4, i = e & 15;
        const long row = b->row + (t & 1) * 16 + i, col = b->col + (t >> 1) * 16;
        if (((t >> 1) && !b->two_n) || row >= M) continue;
        const __m512 add = bias ? _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(bias + col)))
                                : _mm512_setzero_ps();
        _mm256_storeu_si256((__m256i *)(y + row * N + col),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(b->s + t * 256 + i * 16), add)));
    }
}

/* Many rows (phase 2's hundreds to thousands): x is the A operand as it lies (16 rows × 32 of K
 * per tile), and the weight is packed once per call into the B layout (pairs of K × 16 columns:
 * [N/16][K/2][16] pairs in `packed`), so the accumulators hold y's rows and columns as they are,
 * and rounding a block into y needs no transpose. Each thread packs and then owns its share of
 * 32-column blocks; ROW_BLOCK rows of x (in L2) meet each of them in turn, two 16-row tiles × two
 * 16-column tiles at a time. A block's 64 rows are rounded into y during the next block's tile
 * products, a few per step of K: rounded right after its tiles are stored, the loads wait for those
 * stores and the tiles idle (alone, 30 layers of SmolLM2's shapes at 1,105 rows: 111 against 153
 * ms; docs/hardware.md, "Few rows"). A last partial pair of 16-row blocks is read from a
 * zero-padded copy (`tail`, per thread, behind the packed weight). */
static void linear_many(const uint16_t *x, long M, long K, const uint16_t *w, long N, const uint16_t *bias,
                        uint16_t *y, uint32_t *packed, long threads) {
    const long P = K / 2, nb = N / 16, pairs = (nb + 1) / 2, paired = M / 32 * 32, steps = K / 32;
    const int per = (int)((64 + steps - 1) / steps);  /* rows of the previous block rounded per step */
#pragma omp parallel num_threads(threads)
    {
        const long T = omp_get_num_threads(), th = omp_get_thread_num();
        const long j0 = pairs * th / T, j1 = pairs * (th + 1) / T;  /* this thread's 32-column blocks */
        uint16_t *tail = (uint16_t *)(packed + nb * P * 16) + th * 32 * K;
        for (long c = 2 * j0; c < 2 * j1 && c < nb; c++) pack_pairs(w + c * 16 * K, K, 16, packed + c * P * 16);
        if (paired < M && j0 < j1) {
            memcpy(tail, x + paired * K, (M - paired) * K * 2);
            memset(tail + (M - paired) * K, 0, (32 - (M - paired)) * K * 2);
        }
        configure();
        float sums[2][1024] __attribute__((aligned(64)));
        Block32 done = {0, 0, 0, NULL};
        int pending = 0, next = 0;
        for (long r0 = 0; r0 < M; r0 += ROW_BLOCK)
            for (long j = j0; j < j1; j++) {
                const long c = 2 * j;
                const int two_n = c + 1 < nb;
                for (long r = r0; r < M && r < r0 + ROW_BLOCK; r += 32) {
                    const uint16_t *a = r < paired ? x + r * K : tail;
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (long k = 0, step = 0; k < K; k += 32, step++) {  /* tile (i, j): x tile i · weight tile j */
                        _tile_loadd(4, a + k, K * 2);
                        _tile_loadd(5, a + 16 * K + k, K * 2);
                        _tile_loadd(6, packed + (c * P + k / 2) * 16, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 5, 6);
                        if (two_n) {
                            _tile_loadd(7, packed + ((c + 1) * P + k / 2) * 16, 64);
                            _tile_dpbf16ps(2, 4, 7);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                        if (pending && step * per < 64)
                            store_rows(&done, step * per, step * per + per < 64 ? step * per + per : 64, M, N, bias, y);
                    }
                    float *s = sums[next];
                    _tile_stored(0, s, 64);
                    _tile_stored(1, s + 256, 64);
                    if (two_n) {
                        _tile_stored(2, s + 512, 64);
                        _tile_stored(3, s + 768, 64);
                    }
                    done = (Block32){r, c * 16, two_n, s};
                    pending = 1;
                    next ^= 1;
                }
            }
        if (pending) store_rows(&done, 0, 64, M, N, bias, y);
        _tile_release();
    }
}

/* Bytes of `packed` that pc_amx_linear needs for M rows on `threads` threads. */
long pc_amx_linear_workspace(long M, long K, long N, long threads, int pack_weight) {
    return pack_weight ? N * K * 2 + threads * 32 * K * 2 : (M + 15) / 16 * 16 * K * 2;
}

/* The linear layer: linear_many where `pack_weight`, else linear_few. */
void pc_amx_linear(const uint16_t *x, long M, long K, const uint16_t *w, long N, const uint16_t *bias, uint16_t *y,
                   uint32_t *packed, long threads, int pack_weight) {
    (pack_weight ? linear_many : linear_few)(x, M, K, w, N, bias, y, packed, threads);
}
#endif
