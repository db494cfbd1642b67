/* Flash attention forward (Dao et al. 2022, online softmax) for bf16 on x86 CPUs with
 * AVX512-BF16. softmax(Q K^T * scale) V over (batch, heads, tokens, dim) tensors whose last
 * dimension is contiguous. Scores, softmax and the output accumulate in fp32; the products
 * go through vdpbf16ps (pairs of bf16 multiplied into fp32 lanes).
 *
 * Why: PyTorch's CPU flash kernel runs SD1.x's 40-wide heads at ~70 GFLOP/s on this class of
 * CPU (its per-element softmax passes dominate); this one keeps a 64-row block's scores in
 * L1/L2 and fuses scale, mask, max, exp and sum into one vector pass.
 *
 * Layout work is done once per call: K is packed per (batch, head) into groups of 16 keys x
 * pairs of dims, V into pairs of keys x dims, both zero-padded, so the inner loops are plain
 * 64-byte loads. Work is split over (batch, head, 64 query rows) tasks taken by pthreads.
 *
 * Built at run time by engine/diffusion/kernels/native_attention.py (gcc -O3 -mavx512bf16 ...). */

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QB 64   /* query rows per task */
#define KB 256  /* keys per block of the online softmax */
#define KG 16   /* keys (fp32 lanes) per vector */
#define MAX_NV 16 /* dims up to 256 */

typedef uint16_t bf16_t;

typedef struct {
    const bf16_t *q, *k, *v;
    bf16_t *out;
    int64_t batch, heads, tq, tk, dim;
    int64_t qs[3], ks[3], vs[3], os[3]; /* element strides of batch, head, token */
    float scale;
    int64_t tk_pad; /* keys rounded up to 16 */
    int64_t pairs;  /* (dim + 1) / 2 */
    int64_t nv;     /* dim rounded up to 16, in vectors */
    bf16_t *kpack, *vpack;
    int64_t kpack_size, vpack_size; /* elements per (batch, head) */
    int64_t ntasks;
    int64_t next_task;
    int phase; /* 0: pack K and V, 1: attention */
    int failed;
} job_t;

/* e^x for x <= 0: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p the degree-6 Taylor
 * polynomial (relative error ~2e-7, below bf16's 4e-3 resolution). */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

/* K of one (batch, head) as [tk_pad / 16][pairs][16 keys][2 dims]. */
static void pack_k(const job_t *job, int64_t b, int64_t h, bf16_t *dst) {
    const bf16_t *src = job->k + b * job->ks[0] + h * job->ks[1];
    memset(dst, 0, (size_t)job->kpack_size * sizeof(bf16_t));
    for (int64_t key = 0; key < job->tk; key++) {
        const bf16_t *row = src + key * job->ks[2];
        bf16_t *group = dst + (key / KG) * job->pairs * KG * 2 + (key % KG) * 2;
        for (int64_t d = 0; d < job->dim; d++)
            group[(d / 2) * KG * 2 + (d % 2)] = row[d];
    }
}

/* V of one (batch, head) as [tk_pad / 2][nv * 16 dims][2 keys]. */
static void pack_v(const job_t *job, int64_t b, int64_t h, bf16_t *dst) {
    const bf16_t *src = job->v + b * job->vs[0] + h * job->vs[1];
    const int64_t width = job->nv * KG;
    memset(dst, 0, (size_t)job->vpack_size * sizeof(bf16_t));
    for (int64_t key = 0; key < job->tk; key++) {
        const bf16_t *row = src + key * job->vs[2];
        bf16_t *pair = dst + (key / 2) * width * 2 + (key % 2);
        for (int64_t d = 0; d < job->dim; d++)
            pair[d * 2] = row[d];
    }
}

/* scores[4 rows][G * 16 keys] = (Q pairs . K pairs) * scale, keys from `valid` on masked to
 * -inf, and each row's running block maximum updated: the softmax's first pass, done while the
 * scores are still in registers. */
#define DEFINE_QK(G)                                                                          \
    static inline void qk_tile_##G(const uint32_t *qpairs, int64_t pairs, const bf16_t *kgroups, \
                                   float *scores, float scale, int64_t valid, float *row_max) { \
        __m512 acc[4][G];                                                                      \
        for (int r = 0; r < 4; r++)                                                            \
            for (int c = 0; c < G; c++) acc[r][c] = _mm512_setzero_ps();                       \
        for (int64_t p = 0; p < pairs; p++) {                                                 \
            __m512i keys[G];                                                                   \
            for (int c = 0; c < G; c++)                                                        \
                keys[c] = _mm512_loadu_si512(kgroups + (c * pairs + p) * KG * 2);              \
            for (int r = 0; r < 4; r++) {                                                      \
                __m512i query = _mm512_set1_epi32((int)qpairs[r * pairs + p]);                 \
                for (int c = 0; c < G; c++) acc[r][c] = dot_pairs(acc[r][c], query, keys[c]);  \
            }                                                                                  \
        }                                                                                      \
        const __m512 vscale = _mm512_set1_ps(scale);                                           \
        for (int r = 0; r < 4; r++) {                                                          \
            __m512 vmax = _mm512_set1_ps(-INFINITY);                                           \
            for (int c = 0; c < G; c++) {                                                      \
                __m512 x = _mm512_mul_ps(acc[r][c], vscale);                                   \
                if ((c + 1) * KG > valid) {                                                    \
                    int64_t keep = valid > c * KG ? valid - c * KG : 0;                        \
                    x = _mm512_mask_blend_ps((__mmask16)((1u << keep) - 1),                    \
                                             _mm512_set1_ps(-INFINITY), x);                    \
                }                                                                              \
                _mm512_storeu_ps(scores + r * KB + c * KG, x);                                 \
                vmax = _mm512_max_ps(vmax, x);                                                 \
            }                                                                                  \
            row_max[r] = fmaxf(row_max[r], _mm512_reduce_max_ps(vmax));                        \
        }                                                                                      \
    }

DEFINE_QK(4) DEFINE_QK(1)

/* out[R rows][NV vectors] += P pairs . V pairs over `key_pairs` pairs of keys. */
#define DEFINE_PV(R, NV)                                                                      \
    static void pv_##R##_##NV(const uint32_t *probs, const bf16_t *vpairs, int64_t key_pairs,  \
                              float *out, int64_t out_width) {                                 \
        __m512 acc[R][NV];                                                                     \
        for (int r = 0; r < R; r++)                                                            \
            for (int c = 0; c < NV; c++) acc[r][c] = _mm512_loadu_ps(out + r * out_width + c * KG); \
        for (int64_t jp = 0; jp < key_pairs; jp++) {                                          \
            __m512i values[NV];                                                                \
            for (int c = 0; c < NV; c++)                                                       \
                values[c] = _mm512_loadu_si512(vpairs + (jp * NV + c) * KG * 2);               \
            for (int r = 0; r < R; r++) {                                                      \
                __m512i p = _mm512_set1_epi32((int)probs[r * (KB / 2) + jp]);                  \
                for (int c = 0; c < NV; c++) acc[r][c] = dot_pairs(acc[r][c], p, values[c]);  \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; r++)                                                            \
            for (int c = 0; c < NV; c++) _mm512_storeu_ps(out + r * out_width + c * KG, acc[r][c]); \
    }

DEFINE_PV(8, 1) DEFINE_PV(8, 2) DEFINE_PV(8, 3) DEFINE_PV(4, 4) DEFINE_PV(4, 5) DEFINE_PV(4, 6)
DEFINE_PV(2, 7) DEFINE_PV(2, 8) DEFINE_PV(2, 9) DEFINE_PV(2, 10) DEFINE_PV(2, 11)
DEFINE_PV(2, 12) DEFINE_PV(1, 13) DEFINE_PV(1, 14) DEFINE_PV(1, 15) DEFINE_PV(1, 16)

typedef void (*pv_fn)(const uint32_t *, const bf16_t *, int64_t, float *, int64_t);
static const pv_fn PV_KERNELS[MAX_NV + 1] = {
    NULL, pv_8_1, pv_8_2, pv_8_3, pv_4_4, pv_4_5, pv_4_6, pv_2_7, pv_2_8,
    pv_2_9, pv_2_10, pv_2_11, pv_2_12, pv_1_13, pv_1_14, pv_1_15, pv_1_16};
static const int PV_ROWS[MAX_NV + 1] = {0, 8, 8, 8, 4, 4, 4, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1};

typedef struct {
    float *scores;    /* [QB][KB] */
    uint16_t *probs;  /* [QB][KB] bf16 */
    float *acc;       /* [QB][nv * 16] */
    uint32_t *qpairs; /* [QB][pairs] */
    float row_max[QB], row_sum[QB], block_max[QB];
} scratch_t;

/* A pair of bf16 dims read as one little-endian uint32 is the row's own memory, so a row of
 * pairs is a copy of the query row (an odd last dim keeps the zeroed upper half). */
static void load_queries(const job_t *job, const bf16_t *q, int64_t rows, uint32_t *qpairs) {
    memset(qpairs, 0, sizeof(uint32_t) * QB * job->pairs);
    for (int64_t i = 0; i < rows; i++)
        memcpy(qpairs + i * job->pairs, q + i * job->qs[2], sizeof(bf16_t) * job->dim);
}

/* Fold the block's scores (scaled and masked by the QK tiles, their maximum in block_max) into
 * the row's running max and sum; leaves bf16 probabilities in `probs` and rescales the row's
 * output accumulator. */
static void softmax_block(const job_t *job, scratch_t *s, int64_t i, int64_t width) {
    const float *row = s->scores + i * KB;
    const float old_max = s->row_max[i];
    const float new_max = fmaxf(old_max, s->block_max[i]);
    const __m512 shift = _mm512_set1_ps(new_max);
    __m512 vsum = _mm512_setzero_ps();
    uint16_t *prow = s->probs + i * KB;
    for (int64_t j = 0; j < width; j += KG) {
        __m512 p = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift));
        vsum = _mm512_add_ps(vsum, p);
        _mm256_storeu_si256((__m256i *)(prow + j), (__m256i)_mm512_cvtneps_pbh(p));
    }
    const float alpha = expf(old_max - new_max); /* 0 on the first block (old_max = -inf) */
    s->row_sum[i] = s->row_sum[i] * alpha + _mm512_reduce_add_ps(vsum);
    s->row_max[i] = new_max;
    if (alpha != 1.0f) {
        float *acc = s->acc + i * job->nv * KG;
        const __m512 a = _mm512_set1_ps(alpha);
        for (int64_t c = 0; c < job->nv; c++)
            _mm512_storeu_ps(acc + c * KG, _mm512_mul_ps(_mm512_loadu_ps(acc + c * KG), a));
    }
}

static void store_rows(const job_t *job, const scratch_t *s, bf16_t *out, int64_t rows) {
    const int64_t width = job->nv * KG;
    for (int64_t i = 0; i < rows; i++) {
        const __m512 inv = _mm512_set1_ps(1.0f / s->row_sum[i]);
        bf16_t *dst = out + i * job->os[2];
        for (int64_t c = 0; c < job->nv; c++) {
            int64_t left = job->dim - c * KG;
            __mmask16 mask = left >= KG ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s->acc + i * width + c * KG), inv));
            _mm256_mask_storeu_epi16(dst + c * KG, mask, (__m256i)v);
        }
    }
}

static void attend_task(const job_t *job, scratch_t *s, int64_t task) {
    const int64_t qblocks = (job->tq + QB - 1) / QB;
    const int64_t bh = task / qblocks, q0 = (task % qblocks) * QB;
    const int64_t b = bh / job->heads, h = bh % job->heads;
    const int64_t rows = job->tq - q0 < QB ? job->tq - q0 : QB;
    const int64_t width = job->nv * KG;
    const bf16_t *kp = job->kpack + bh * job->kpack_size;
    const bf16_t *vp = job->vpack + bh * job->vpack_size;
    const int rstep = PV_ROWS[job->nv];
    const pv_fn pv = PV_KERNELS[job->nv];

    load_queries(job, job->q + b * job->qs[0] + h * job->qs[1] + q0 * job->qs[2], rows, s->qpairs);
    memset(s->acc, 0, sizeof(float) * QB * width);
    for (int64_t i = 0; i < QB; i++) {
        s->row_max[i] = -INFINITY;
        s->row_sum[i] = 0.0f;
    }
    const int64_t row_tiles = (rows + 3) / 4 * 4;
    for (int64_t k0 = 0; k0 < job->tk; k0 += KB) {
        const int64_t span = job->tk_pad - k0 < KB ? job->tk_pad - k0 : KB; /* multiple of 16 */
        const int64_t valid = job->tk - k0 < span ? job->tk - k0 : span;
        for (int64_t i = 0; i < row_tiles; i++) s->block_max[i] = -INFINITY;
        for (int64_t r = 0; r < row_tiles; r += 4) {
            const uint32_t *qpairs = s->qpairs + r * job->pairs;
            float *scores = s->scores + r * KB;
            int64_t g = 0;
            for (; g + 4 * KG <= span; g += 4 * KG)
                qk_tile_4(qpairs, job->pairs, kp + ((k0 + g) / KG) * job->pairs * KG * 2,
                          scores + g, job->scale, valid - g, s->block_max + r);
            for (; g < span; g += KG)
                qk_tile_1(qpairs, job->pairs, kp + ((k0 + g) / KG) * job->pairs * KG * 2,
                          scores + g, job->scale, valid - g, s->block_max + r);
        }
        for (int64_t i = 0; i < rows; i++) softmax_block(job, s, i, span);
        for (int64_t r = 0; r < rows; r += rstep)
            pv((const uint32_t *)(s->probs + r * KB), vp + (k0 / 2) * width * 2, span / 2,
               s->acc + r * width, width);
    }
    store_rows(job, s, job->out + b * job->os[0] + h * job->os[1] + q0 * job->os[2], rows);
}

static void *worker(void *arg) {
    job_t *job = (job_t *)arg;
    scratch_t s;
    memset(&s, 0, sizeof(s));
    if (job->phase == 1) {
        s.scores = aligned_alloc(64, sizeof(float) * QB * KB);
        s.probs = aligned_alloc(64, sizeof(uint16_t) * QB * KB);
        s.acc = aligned_alloc(64, sizeof(float) * QB * job->nv * KG);
        s.qpairs = aligned_alloc(64, sizeof(uint32_t) * QB * ((job->pairs + 15) / 16 * 16));
        if (!s.scores || !s.probs || !s.acc || !s.qpairs) {
            __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
            goto done;
        }
        /* rows past the valid ones are read by the 4-row QK tiles and the PV kernels */
        memset(s.probs, 0, sizeof(uint16_t) * QB * KB);
    }
    for (;;) {
        int64_t task = __atomic_fetch_add(&job->next_task, 1, __ATOMIC_RELAXED);
        if (task >= job->ntasks) break;
        if (job->phase == 0) {
            int64_t b = task / job->heads, h = task % job->heads;
            pack_k(job, b, h, job->kpack + task * job->kpack_size);
            pack_v(job, b, h, job->vpack + task * job->vpack_size);
        } else {
            attend_task(job, &s, task);
        }
    }
done:
    free(s.scores);
    free(s.probs);
    free(s.acc);
    free(s.qpairs);
    return NULL;
}

static int run_phase(job_t *job, int phase, int64_t ntasks, int threads) {
    pthread_t ids[256];
    int started = 0;
    job->phase = phase;
    job->ntasks = ntasks;
    job->next_task = 0;
    if (threads > 256) threads = 256;
    if (threads > ntasks) threads = (int)ntasks;
    for (int t = 1; t < threads; t++)
        if (pthread_create(&ids[started], NULL, worker, job) == 0) started++;
    worker(job);
    for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
    return job->failed;
}

/* Returns 0 on success, 1 when scratch memory could not be allocated, 2 on bad sizes.
 * Strides are in elements, for the batch, head and token dimensions (dim is contiguous). */
int loom_flash_attention_bf16(const bf16_t *q, const bf16_t *k, const bf16_t *v, bf16_t *out,
                              int64_t batch, int64_t heads, int64_t tq, int64_t tk, int64_t dim,
                              const int64_t *q_strides, const int64_t *k_strides,
                              const int64_t *v_strides, const int64_t *out_strides, float scale,
                              int threads) {
    if (dim < 1 || dim > MAX_NV * KG || tq < 1 || tk < 1 || batch < 1 || heads < 1) return 2;
    job_t job;
    memset(&job, 0, sizeof(job));
    job.q = q, job.k = k, job.v = v, job.out = out;
    job.batch = batch, job.heads = heads, job.tq = tq, job.tk = tk, job.dim = dim;
    for (int i = 0; i < 3; i++) {
        job.qs[i] = q_strides[i], job.ks[i] = k_strides[i];
        job.vs[i] = v_strides[i], job.os[i] = out_strides[i];
    }
    job.scale = scale;
    job.tk_pad = (tk + KG - 1) / KG * KG;
    job.pairs = (dim + 1) / 2;
    job.nv = (dim + KG - 1) / KG;
    job.kpack_size = job.tk_pad * job.pairs * 2;
    job.vpack_size = job.tk_pad * job.nv * KG;
    job.kpack = aligned_alloc(64, sizeof(bf16_t) * batch * heads * job.kpack_size);
    job.vpack = aligned_alloc(64, sizeof(bf16_t) * batch * heads * job.vpack_size);
    int status = (!job.kpack || !job.vpack) ? 1 : 0;
    if (status == 0) status = run_phase(&job, 0, batch * heads, threads);
    if (status == 0) status = run_phase(&job, 1, batch * heads * ((tq + QB - 1) / QB), threads);
    free(job.kpack);
    free(job.vpack);
    return status;
}
