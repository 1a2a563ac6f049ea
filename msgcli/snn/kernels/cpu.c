/* Fused CPU kernels of msgsnn (see cpu.py): the LIF time loop, per-timestep BatchNorm, MSG masks, spikes as bit planes. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define BLK 512

typedef uint16_t bf16;
static inline float bf2f(bf16 v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16 f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

/* ------------------------------------------------------------------ MT19937 as in ATen */

typedef struct { uint32_t mt[624]; int64_t left; int64_t next; } mtstate;

/* torch.get_rng_state() layout: u64 seed, i32 left, i32 seeded, u64 next, u64 state[624], ... */
static void mt_load(mtstate* s, const uint8_t* st) {
    int32_t left; uint64_t next;
    memcpy(&left, st + 8, 4); memcpy(&next, st + 16, 8);
    for (int i = 0; i < 624; i++) { uint64_t w; memcpy(&w, st + 24 + 8 * i, 8); s->mt[i] = (uint32_t)w; }
    s->left = left; s->next = (int64_t)next;
}

static void mt_store(const mtstate* s, uint8_t* st) {
    int32_t left = (int32_t)s->left; uint64_t next = (uint64_t)s->next;
    memcpy(st + 8, &left, 4); memcpy(st + 16, &next, 8);
    for (int i = 0; i < 624; i++) { uint64_t w = s->mt[i]; memcpy(st + 24 + 8 * i, &w, 8); }
}

#define MT_TW(u, v) (((((u) & 0x80000000u) | ((v) & 0x7fffffffu)) >> 1) ^ ((0u - ((v) & 1u)) & 0x9908b0dfu))

/* in place; the loops vectorise (dependences at distance 1 backwards and 227 forwards) */
static void mt_twist(uint32_t* restrict p) {
    for (int j = 0; j < 227; j++) p[j] = p[j + 397] ^ MT_TW(p[j], p[j + 1]);
    for (int j = 227; j < 623; j++) p[j] = p[j - 227] ^ MT_TW(p[j], p[j + 1]);
    p[623] = p[396] ^ MT_TW(p[623], p[0]);
}

/* n keep-bytes (1 = keep) from the stream, keep <=> (y & 0xffffff) >= thr, i.e. rand() >= p */
static void mt_keep(mtstate* s, uint8_t* restrict out, int64_t n, uint32_t thr) {
    while (n > 0) {
        int64_t avail = s->left - 1;
        if (avail <= 0) { mt_twist(s->mt); s->left = 625; s->next = 0; avail = 624; }
        int64_t k = n < avail ? n : avail;
        const uint32_t* restrict src = s->mt + s->next;
        for (int64_t i = 0; i < k; i++) {
            uint32_t y = src[i];
            y ^= y >> 11; y ^= (y << 7) & 0x9d2c5680u; y ^= (y << 15) & 0xefc60000u; y ^= y >> 18;
            out[i] = (uint8_t)((y & 0xffffffu) >= thr);
        }
        s->left -= k; s->next += k; out += k; n -= k;
    }
}

static inline void set_bit(uint8_t* row, int64_t i, int v) { row[i >> 3] |= (uint8_t)(v << (i & 7)); }

/* bits[t * rowbytes ...]: bit p = keep for physical element p at timestep t. mode: the index in
   msgcli/snn/options.py's MASK_MODES (0 element, 1 channel, 2 timestep). */
/* scratch: at least C*L + L bytes */
void msg_draw_mask(uint8_t* state, uint8_t* bits, int64_t rowbytes, int64_t T, int64_t B, int64_t C, int64_t L,
                   int nlc, int mode, uint32_t thr, uint8_t* scratch) {
    mtstate s; mt_load(&s, state);
    const int64_t per = mode == 0 ? C * L : (mode == 1 ? C : 1);
    uint8_t* tmp = scratch;
    uint8_t* ob = scratch + C * L;
    memset(bits, 0, (size_t)(T * rowbytes));
    for (int64_t t = T - 1; t >= 0; t--) {
        uint8_t* row = bits + t * rowbytes;
        for (int64_t b = 0; b < B; b++) {
            mt_keep(&s, tmp, per, thr);
            const int64_t base = b * C * L;
            if (mode == 0 && (!nlc || C == 1 || L == 1)) {
                int64_t i = 0;
                if ((base & 7) == 0) {
                    uint8_t* dst = row + (base >> 3);
                    for (; i + 8 <= per; i += 8) {  /* eight 0/1 bytes -> one byte, bit j = byte j */
                        uint64_t w; memcpy(&w, tmp + i, 8);
                        dst[i >> 3] = (uint8_t)((w * 0x0102040810204080ull) >> 56);
                    }
                }
                for (; i < per; i++) set_bit(row, base + i, tmp[i]);
            } else if (mode == 0 && (C & 7) == 0) {
                /* logical [C][L] -> physical [L][C] bits, eight channels at a time */
                uint8_t* dst = row + (base >> 3);
                const int64_t cb = C >> 3;
                for (int64_t k = 0; k < cb; k++) {
                    const uint8_t* q = tmp + 8 * k * L;
                    for (int64_t l = 0; l < L; l++)
                        ob[l] = (uint8_t)(q[l] | q[L + l] << 1 | q[2 * L + l] << 2 | q[3 * L + l] << 3 | q[4 * L + l] << 4
                                          | q[5 * L + l] << 5 | q[6 * L + l] << 6 | q[7 * L + l] << 7);
                    for (int64_t l = 0; l < L; l++) dst[l * cb + k] = ob[l];
                }
            } else {
                for (int64_t c = 0; c < C; c++)
                    for (int64_t l = 0; l < L; l++) {
                        int v = mode == 0 ? tmp[c * L + l] : (mode == 1 ? tmp[c] : tmp[0]);
                        set_bit(row, nlc ? base + l * C + c : base + c * L + l, v);
                    }
            }
        }
    }
    mt_store(&s, state);
}

/* expands a mask byte to eight 0/1 bytes */
static uint64_t LUT[256];
__attribute__((constructor)) static void init_lut(void) {
    for (int v = 0; v < 256; v++) {
        uint64_t w = 0;
        for (int i = 0; i < 8; i++) w |= (uint64_t)((v >> i) & 1) << (8 * i);
        LUT[v] = w;
    }
}

/* g[i] = 0 where bit i of row is clear, for n <= BLK (row starts at a byte boundary): AVX-512 masked
   moves where the compiler targets it; elsewhere the bits expanded to bytes and a select the compiler
   vectorises (a bit test per entry would branch on random bits: a misprediction every other entry) */
#ifdef __AVX512F__
#include <immintrin.h>
#define KEEP_ZERO_REST(g, row, i, n) for (; i < n; i++) if (!((row[i >> 3] >> (i & 7)) & 1)) g[i] = 0
static void keep_zero_float(float* restrict g, const uint8_t* restrict row, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __mmask16 m = (__mmask16)(row[i >> 3] | (row[(i >> 3) + 1] << 8));
        _mm512_storeu_ps(g + i, _mm512_maskz_mov_ps(m, _mm512_loadu_ps(g + i)));
    }
    KEEP_ZERO_REST(g, row, i, n);
}
static void keep_zero_double(double* restrict g, const uint8_t* restrict row, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm512_storeu_pd(g + i, _mm512_maskz_mov_pd((__mmask8)row[i >> 3], _mm512_loadu_pd(g + i)));
    KEEP_ZERO_REST(g, row, i, n);
}
#else
#define DEF_KEEP_ZERO(ct)                                                                     \
static void keep_zero_##ct(ct* restrict g, const uint8_t* restrict row, int n) {             \
    uint8_t kb[BLK + 8];                                                                      \
    for (int j = 0; j < (n + 7) / 8; j++) memcpy(kb + 8 * j, &LUT[row[j]], 8);                \
    for (int i = 0; i < n; i++) g[i] = kb[i] ? g[i] : (ct)0;                                  \
}
DEF_KEEP_ZERO(float)
DEF_KEEP_ZERO(double)
#endif

/* Asks for the cache lines of bytes [p, p + bytes) ahead of their use. The fused BatchNorm-LIF kernels read T
   streams of each input a block at a time; in bf16 a block's timestep is 1 KiB, too short a run for the
   hardware's prefetcher to be ahead: asking for the next block's lines took 0.85-0.9x the time, where in
   float32 it took 1.05-1.17x and with one timestep (one stream) 1.02-1.05x, so only those ask (prefetched). */
static inline int64_t prefetched(int64_t T, size_t bytes, int64_t q0, int64_t N) {
    /* entries of the block from q0 on to ask for: 0 where the kernel does not ask, or past the end */
    return T > 1 && bytes == 2 && q0 < N ? (N - q0 < BLK ? N - q0 : BLK) : 0;
}
static inline void prefetch_span(const void* p, int64_t bytes) {
    const char* c = (const char*)p;
    for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(c + k, 0, 3);
}

/* ------------------------------------------------------------------ LIF */

#define ABSV(v) ((v) < 0 ? -(v) : (v))

/* sid: a surrogate's kernel_id in msgcli/snn/surrogate.py's table; fill: such an id, or -1 (ZERO_FILL_ID) for zero */
#define DEF_SURR(S, ct, EXP)                                                                  \
static void surr_##S(const ct* restrict x, ct* restrict g, int n, int sid, double alpha) {     \
    const ct a = (ct)alpha;                                                                   \
    if (sid == 0) {                                                                           \
        const ct a2 = (ct)(alpha * alpha);                                                    \
        for (int i = 0; i < n; i++) { ct v = a - a2 * ABSV(x[i]); g[i] = v > 0 ? v : (ct)0; } \
    } else if (sid == 1) {                                                                    \
        const ct k = (ct)(3.14159265358979323846 / 2 * alpha);                                \
        for (int i = 0; i < n; i++) { ct z = k * x[i]; g[i] = a / ((ct)1 + z * z); }          \
    } else if (sid == 2) {                                                                    \
        for (int i = 0; i < n; i++) { ct s = (ct)1 / ((ct)1 + EXP(-(a * x[i]))); g[i] = a * s * ((ct)1 - s); } \
    } else if (sid == 3) {                                                                    \
        const ct w = (ct)(1.0 / alpha);                                                       \
        for (int i = 0; i < n; i++) g[i] = ABSV(x[i]) < w ? a : (ct)0;                         \
    } else {                                                                                  \
        for (int i = 0; i < n; i++) g[i] = 0; /* no surrogate has this id: Python passes none */ \
    }                                                                                         \
}

/* The LIF's options that shape its gradient: sid, fill (surrogate ids, see DEF_SURR), keep_div (MSG's
   rescaling divisor, 0: none). */
typedef struct { double tau, vth, alpha, keep_div; int hard, detach, sid, fill; } lif_opts;

/* One timestep of a block of n <= BLK neurons. Forward (NAME): the input current y (loaded), the
   membrane v carried in the compute type, spikes and (if hp) H stored, H as type ht by HST. Backward:
   H (loaded) of this step, the spikes' gradient gp, the input gradient op stored, the membrane's
   gradient gv carried (timesteps latest first), the MSG keep bits of this step's row (or NULL). */
#define DEF_LIF_FWD_STEP(NAME, st, ct, LD, ST, ht, HST)                                       \
static inline void NAME(const ct* restrict y, st* restrict sp, ht* restrict hp,               \
                        ct* restrict v, int n, ct tau, ct vth, int hard) {                    \
    if (hard && hp) for (int i = 0; i < n; i++) {                                             \
        ct hv = LD(ST(v[i] + (y[i] - v[i]) / tau)); int f = hv >= vth;                        \
        sp[i] = ST((ct)f); hp[i] = HST(hv); v[i] = f ? (ct)0 : hv; }                          \
    else if (hard) for (int i = 0; i < n; i++) {                                              \
        ct hv = LD(ST(v[i] + (y[i] - v[i]) / tau)); int f = hv >= vth;                        \
        sp[i] = ST((ct)f); v[i] = f ? (ct)0 : hv; }                                           \
    else if (hp) for (int i = 0; i < n; i++) {                                                \
        ct hv = LD(ST(v[i] + (y[i] - v[i]) / tau)); ct f = (ct)(hv >= vth);                   \
        sp[i] = ST(f); hp[i] = HST(hv); v[i] = LD(ST(hv - vth * f)); }                        \
    else for (int i = 0; i < n; i++) {                                                        \
        ct hv = LD(ST(v[i] + (y[i] - v[i]) / tau)); ct f = (ct)(hv >= vth);                   \
        sp[i] = ST(f); v[i] = LD(ST(hv - vth * f)); }                                         \
}

#define DEF_LIF_STEPS(S, st, ct, LD, ST)                                                      \
DEF_LIF_FWD_STEP(lif_fwd_step_##S, st, ct, LD, ST, st, ST)                                    \
DEF_LIF_FWD_STEP(lif_membrane_step_##S, st, ct, LD, ST, ct, ID)                               \
                                                                                              \
static inline void lif_bwd_step_##S(const ct* restrict ha, const st* gp, st* op,             \
                                    ct* restrict gv, const uint8_t* restrict row, int n,       \
                                    const lif_opts* o) {                                       \
    const ct tau = (ct)o->tau, vth = (ct)o->vth, leak = (ct)(1.0 - 1.0 / o->tau);             \
    ct xa[BLK], g[BLK], fl[BLK];                                                              \
    uint8_t kb[BLK + 8];                                                                      \
    for (int i = 0; i < n; i++) xa[i] = ha[i] - vth;                                          \
    surr_##S(xa, g, n, o->sid, o->alpha);                                                     \
    if (row) {                                                                                \
        if (o->keep_div != 0) { const ct kdiv = (ct)o->keep_div; for (int i = 0; i < n; i++) g[i] = g[i] / kdiv; } \
        if (o->fill < 0) keep_zero_##ct(g, row, n);                                           \
        else {                                                                                \
            for (int j = 0; j < (n + 7) / 8; j++) memcpy(kb + 8 * j, &LUT[row[j]], 8);        \
            surr_##S(xa, fl, n, o->fill, o->alpha);                                           \
            for (int i = 0; i < n; i++) g[i] = kb[i] ? g[i] : fl[i];                          \
        }                                                                                     \
    }                                                                                         \
    if (o->hard && !o->detach) for (int i = 0; i < n; i++) {                                  \
        ct s = LD(gp[i]) - gv[i] * ha[i];                                                     \
        ct gh = (xa[i] < 0 ? gv[i] : (ct)0) + s * g[i];                                       \
        op[i] = ST(gh / tau); gv[i] = gh * leak; }                                            \
    else if (o->hard) for (int i = 0; i < n; i++) {                                           \
        ct gh = (xa[i] < 0 ? gv[i] : (ct)0) + LD(gp[i]) * g[i];                               \
        op[i] = ST(gh / tau); gv[i] = gh * leak; }                                            \
    else if (!o->detach) for (int i = 0; i < n; i++) {                                        \
        ct s = LD(gp[i]) - vth * gv[i];                                                       \
        ct gh = gv[i] + s * g[i];                                                             \
        op[i] = ST(gh / tau); gv[i] = gh * leak; }                                            \
    else for (int i = 0; i < n; i++) {                                                        \
        ct gh = gv[i] + LD(gp[i]) * g[i];                                                     \
        op[i] = ST(gh / tau); gv[i] = gh * leak; }                                            \
}

/* vc, gvc: the membrane V after the last timestep, and its gradient before the first, carried between
   calls over consecutive chunks of timesteps (read at the start, written at the end), in the compute type;
   NULL: V and its gradient start at 0 and are not kept. */
#define DEF_LIF(S, st, ct, LD, ST)                                                            \
void lif_fwd_##S(const st* restrict x, st* restrict s, st* restrict h, ct* restrict vc,        \
                 int64_t T, int64_t N, double tau_, double vth_, int hard, int nt) {          \
    const ct tau = (ct)tau_, vth = (ct)vth_;                                                  \
    const int64_t nb = (N + BLK - 1) / BLK;                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t b = 0; b < nb; b++) {                                                        \
        const int64_t p0 = b * BLK;                                                           \
        const int n = (int)(N - p0 < BLK ? N - p0 : BLK);                                     \
        ct v[BLK], y[BLK];                                                                    \
        for (int i = 0; i < n; i++) v[i] = vc ? vc[p0 + i] : (ct)0;                           \
        for (int64_t t = 0; t < T; t++) {                                                     \
            const st* restrict xt = x + t * N + p0;                                           \
            for (int i = 0; i < n; i++) y[i] = LD(xt[i]);                                     \
            lif_fwd_step_##S(y, s + t * N + p0, h ? h + t * N + p0 : 0, v, n, tau, vth, hard); \
        }                                                                                     \
        if (vc) for (int i = 0; i < n; i++) vc[p0 + i] = v[i];                                \
    }                                                                                         \
}                                                                                             \
                                                                                              \
void lif_bwd_##S(const st* restrict gs, const st* restrict h, st* restrict gx, ct* restrict gvc, \
                 const uint8_t* restrict bits, int64_t rowbytes, int64_t T, int64_t N,         \
                 double tau_, double vth_, int hard, int detach, int sid, double alpha,        \
                 int fill, double keep_div, int nt) {                                         \
    const lif_opts o = {tau_, vth_, alpha, keep_div, hard, detach, sid, fill};                \
    const int64_t nb = (N + BLK - 1) / BLK;                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t b = 0; b < nb; b++) {                                                        \
        const int64_t p0 = b * BLK;                                                           \
        const int n = (int)(N - p0 < BLK ? N - p0 : BLK);                                     \
        ct gv[BLK], ha[BLK];                                                                  \
        for (int i = 0; i < n; i++) gv[i] = gvc ? gvc[p0 + i] : (ct)0;                        \
        for (int64_t t = T - 1; t >= 0; t--) {                                                \
            const st* restrict hp = h + t * N + p0;                                           \
            for (int i = 0; i < n; i++) ha[i] = LD(hp[i]);                                    \
            lif_bwd_step_##S(ha, gs + t * N + p0, gx + t * N + p0, gv,                        \
                             bits ? bits + t * rowbytes + (p0 >> 3) : 0, n, &o);             \
        }                                                                                     \
        if (gvc) for (int i = 0; i < n; i++) gvc[p0 + i] = gv[i];                             \
    }                                                                                         \
}

/* ------------------------------------------------------------------ BatchNorm's affine map and the LIF, fused */
/* The current y = x * scale[t, c] + shift[t, c] (as bn_apply rounds it) of x [T][B][C][L] (nlc = 0) or
   [T][B][L][C] (nlc = 1) goes straight into the LIF: forward writes only the spikes, and backward, from
   the same x, recomputes y and the membrane H of a block of neurons over all T (into a per-thread
   buffer) before running the LIF's backward over them: one float tensor (x) is all a BatchNorm-LIF
   pair keeps, and the numbers are those of bn_apply, lif_fwd and lif_bwd, bit for bit. vc (read only
   in backward) and gvc as in DEF_LIF, never NULL here. Backward's gx may be gs itself: each entry of gs is
   read before its gradient is written in its place. Returns 1 when a work space cannot be allocated. */
/* The channel of each of the n neurons of a block starting at p0 (the timestep's physical order);
   returns the block's rows of C channels when it holds whole ones (channels-last, C dividing BLK), for
   a loop over channels that needs no gather, else 0. */
static int bnlif_channels(int* restrict ci, int64_t p0, int n, int64_t C, int64_t L, int nlc) {
    if (nlc && p0 % C == 0 && n % C == 0) return (int)(n / C);
    for (int i = 0; i < n; i++) ci[i] = (int)(nlc ? (p0 + i) % C : ((p0 + i) / L) % C);
    return 0;
}

#define DEF_BNLIF(S, st, ct, LD, ST)                                                          \
static void bnlif_current_##S(const st* restrict xt, const ct* restrict a, const ct* restrict sh, \
                              const int* restrict ci, int rows, int64_t C, ct* restrict y, int n) { \
    if (rows) {                                                                               \
        for (int r = 0; r < rows; r++) {                                                      \
            const st* restrict xr = xt + r * C; ct* restrict yr = y + r * C;                  \
            for (int64_t c = 0; c < C; c++) yr[c] = LD(ST(LD(xr[c]) * a[c] + sh[c]));         \
        }                                                                                     \
    } else {                                                                                  \
        for (int i = 0; i < n; i++) y[i] = LD(ST(LD(xt[i]) * a[ci[i]] + sh[ci[i]]));          \
    }                                                                                         \
}                                                                                             \
                                                                                              \
static ct* bnlif_coefficients_##S(const double* scale, const double* shift, int64_t TC) {      \
    ct* co = (ct*)malloc(sizeof(ct) * 2 * TC);                                                \
    if (co) for (int64_t k = 0; k < TC; k++) { co[k] = (ct)scale[k]; co[TC + k] = (ct)shift[k]; } \
    return co;                                                                                \
}                                                                                             \
                                                                                              \
int bnlif_fwd_##S(const st* restrict x, st* restrict s, const double* restrict scale,         \
                  const double* restrict shift, ct* restrict vc, int64_t T, int64_t B, int64_t C, \
                  int64_t L, double tau_, double vth_, int hard, int nlc, int nt) {            \
    const int64_t N = B * C * L, TC = T * C;                                                  \
    const ct tau = (ct)tau_, vth = (ct)vth_;                                                  \
    ct* co = bnlif_coefficients_##S(scale, shift, TC);                                        \
    if (!co) return 1;                                                                        \
    const int64_t nb = (N + BLK - 1) / BLK;                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t b = 0; b < nb; b++) {                                                        \
        const int64_t p0 = b * BLK;                                                           \
        const int n = (int)(N - p0 < BLK ? N - p0 : BLK);                                     \
        ct v[BLK], y[BLK]; int ci[BLK];                                                       \
        const int rows = bnlif_channels(ci, p0, n, C, L, nlc);                                \
        for (int i = 0; i < n; i++) v[i] = vc[p0 + i];                                        \
        const int64_t q0 = p0 + BLK, m = prefetched(T, sizeof(st), q0, N);  /* the next block */ \
        for (int64_t t = 0; t < T; t++) {                                                     \
            if (m > 0) prefetch_span(x + t * N + q0, m * (int64_t)sizeof(st));                 \
            bnlif_current_##S(x + t * N + p0, co + t * C, co + TC + t * C, ci, rows, C, y, n);         \
            lif_fwd_step_##S(y, s + t * N + p0, 0, v, n, tau, vth, hard);                     \
        }                                                                                     \
        for (int i = 0; i < n; i++) vc[p0 + i] = v[i];                                        \
    }                                                                                         \
    free(co);                                                                                 \
    return 0;                                                                                 \
}                                                                                             \
                                                                                              \
int bnlif_bwd_##S(const st* gs, int64_t gstep, const st* restrict x, st* gx,                  \
                  const double* restrict scale, const double* restrict shift,                 \
                  const ct* restrict vc, ct* restrict gvc, const uint8_t* restrict bits,       \
                  int64_t rowbytes, int64_t T, int64_t B, int64_t C, int64_t L,               \
                  double tau_, double vth_, int hard, int detach, int sid, double alpha,       \
                  int fill, double keep_div, int nlc, int nt) {                                        \
    const int64_t N = B * C * L, TC = T * C;                                                  \
    const ct tau = (ct)tau_, vth = (ct)vth_;                                                  \
    const lif_opts o = {tau_, vth_, alpha, keep_div, hard, detach, sid, fill};                \
    ct* co = bnlif_coefficients_##S(scale, shift, TC);                                        \
    if (!co) return 1;                                                                        \
    const int64_t nb = (N + BLK - 1) / BLK;                                                   \
    int failed = 0;                                                                           \
    _Pragma("omp parallel num_threads(nt)")                                                   \
    {                                                                                         \
        ct* hall = (ct*)malloc(sizeof(ct) * (size_t)(T * BLK));                               \
        if (!hall) { _Pragma("omp atomic write") failed = 1; }                                \
        _Pragma("omp for schedule(static)")                                                   \
        for (int64_t b = 0; b < nb; b++) {                                                    \
            if (!hall) continue;                                                              \
            const int64_t p0 = b * BLK;                                                       \
            const int n = (int)(N - p0 < BLK ? N - p0 : BLK);                                 \
            ct v[BLK], y[BLK], gv[BLK]; int ci[BLK];                                          \
            st sink[BLK];  /* the recomputed spikes: not needed */                            \
            const int rows = bnlif_channels(ci, p0, n, C, L, nlc);                            \
            for (int i = 0; i < n; i++) { v[i] = vc[p0 + i]; gv[i] = gvc[p0 + i]; }           \
            const int64_t q0 = p0 + BLK, m = prefetched(T, sizeof(st), q0, N);  /* the next block */ \
            for (int64_t t = 0; t < T; t++) {                                                 \
                if (m > 0) prefetch_span(x + t * N + q0, m * (int64_t)sizeof(st));             \
                bnlif_current_##S(x + t * N + p0, co + t * C, co + TC + t * C, ci, rows, C, y, n);     \
                lif_membrane_step_##S(y, sink, hall + t * BLK, v, n, tau, vth, hard);          \
            }                                                                                 \
            for (int64_t t = T - 1; t >= 0; t--) {                                            \
                if (m > 0) {                                                                  \
                    prefetch_span(gs + t * gstep + q0, m * (int64_t)sizeof(st));               \
                    if (bits) prefetch_span(bits + t * rowbytes + (q0 >> 3), (m + 7) >> 3);    \
                }                                                                             \
                lif_bwd_step_##S(hall + t * BLK, gs + t * gstep + p0, gx + t * N + p0, gv,    \
                                 bits ? bits + t * rowbytes + (p0 >> 3) : 0, n, &o);         \
            }                                                                                 \
            for (int i = 0; i < n; i++) gvc[p0 + i] = gv[i];                                  \
        }                                                                                     \
        free(hall);                                                                           \
    }                                                                                         \
    free(co);                                                                                 \
    return failed;                                                                            \
}

/* ------------------------------------------------------------------ per-timestep BatchNorm */
/* x: [T][B][C][L] (nlc = 0) or [T][B][L][C] (nlc = 1); statistics per (t, c) over B*L, accumulated in
   double and shifted by the first sample of each (t, c). One parallel region per call: barriers are
   expensive when the machine is oversubscribed. */

/* Sums for nlc over fixed chunks of NLC_CHUNK rows (t, r), each chunk's partial [C] sums added in
   chunk order afterwards: the result is the same whatever the number of threads or their speed. */
#define NLC_CHUNK 256
#define NLC_SUMS(st, LD, EXPR1, EXPR2, OUT1, OUT2)                                            \
    {                                                                                         \
        const int64_t nc = (M + NLC_CHUNK - 1) / NLC_CHUNK;                                   \
        double* part = (double*)malloc(sizeof(double) * (size_t)(2 * T * nc * C));            \
        if (!part) return 1;                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt)")                          \
        for (int64_t tk = 0; tk < T * nc; tk++) {                                             \
            const int64_t t = tk / nc, r0 = (tk % nc) * NLC_CHUNK;                            \
            const int64_t r1 = r0 + NLC_CHUNK < M ? r0 + NLC_CHUNK : M;                       \
            double* restrict a1 = part + tk * 2 * C; double* restrict a2 = a1 + C;            \
            const double* restrict sh = shiftv + t * C;                                       \
            for (int64_t c = 0; c < C; c++) { a1[c] = 0; a2[c] = 0; }                         \
            for (int64_t r = r0; r < r1; r++) {                                               \
                const int64_t o = t * N + r * C;                                              \
                for (int64_t c = 0; c < C; c++) {                                             \
                    double e1 = (EXPR1), e2 = (EXPR2); a1[c] += e1; a2[c] += e2; }            \
            }                                                                                 \
        }                                                                                     \
        for (int64_t t = 0; t < T; t++)                                                       \
            for (int64_t c = 0; c < C; c++) {                                                 \
                double u = 0, w = 0;                                                          \
                for (int64_t k = 0; k < nc; k++) {                                            \
                    const double* pk = part + (t * nc + k) * 2 * C; u += pk[c]; w += pk[C + c]; } \
                OUT1[t * C + c] = u; OUT2[t * C + c] = w; }                                   \
        free(part);                                                                           \
    }

#define DEF_BN(S, st, ct, LD, ST)                                                             \
int bn_stats_##S(const st* restrict x, double* restrict mean, double* restrict var,            \
                 int64_t T, int64_t B, int64_t C, int64_t L, int nlc, int nt) {               \
    const int64_t N = B * C * L, M = B * L;                                                   \
    if (nlc) {                                                                                \
        double* shiftv = (double*)malloc(sizeof(double) * T * C);                             \
        if (!shiftv) return 1;                                                                \
        for (int64_t t = 0; t < T; t++) for (int64_t c = 0; c < C; c++) shiftv[t * C + c] = LD(x[t * N + c]); \
        NLC_SUMS(st, LD, (double)LD(x[o + c]) - sh[c], e1 * e1, mean, var)                    \
        for (int64_t k = 0; k < T * C; k++) {                                                 \
            double d = mean[k] / M; mean[k] = shiftv[k] + d; double q = var[k] / M - d * d;   \
            var[k] = q > 0 ? q : 0; }                                                         \
        free(shiftv);                                                                         \
    } else {                                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt)")                          \
        for (int64_t tc = 0; tc < T * C; tc++) {                                              \
            const int64_t t = tc / C, c = tc % C;                                             \
            const st* restrict xt = x + t * N + c * L;                                        \
            const double K = LD(xt[0]);                                                       \
            double a = 0, q = 0;                                                              \
            for (int64_t b = 0; b < B; b++) {                                                 \
                const st* restrict xb = xt + b * C * L;                                       \
                _Pragma("omp simd reduction(+:a,q)")                                          \
                for (int64_t l = 0; l < L; l++) { double d = (double)LD(xb[l]) - K; a += d; q += d * d; } \
            }                                                                                 \
            double d = a / M; mean[tc] = K + d; double w = q / M - d * d; var[tc] = w > 0 ? w : 0; \
        }                                                                                     \
    }                                                                                         \
    return 0;                                                                                 \
}                                                                                             \
                                                                                              \
/* y = x * scale[t, c] + shift[t, c] */                                                       \
int bn_apply_##S(const st* restrict x, st* restrict y, const double* restrict scale,          \
                 const double* restrict shift, int64_t T, int64_t B, int64_t C, int64_t L, int nlc, int nt) { \
    const int64_t N = B * C * L, M = B * L;                                                   \
    ct* co = (ct*)malloc(sizeof(ct) * 2 * T * C);                                             \
    if (!co) return 1;                                                                        \
    for (int64_t k = 0; k < T * C; k++) { co[k] = (ct)scale[k]; co[T * C + k] = (ct)shift[k]; } \
    if (nlc) {                                                                                \
        _Pragma("omp parallel for schedule(static) num_threads(nt)")                          \
        for (int64_t tr = 0; tr < T * M; tr++) {                                              \
            const int64_t t = tr / M, o = t * N + (tr % M) * C;                               \
            const ct* restrict a = co + t * C; const ct* restrict s = co + T * C + t * C;     \
            const st* restrict xr = x + o; st* restrict yr = y + o;                           \
            for (int64_t c = 0; c < C; c++) yr[c] = ST(LD(xr[c]) * a[c] + s[c]);              \
        }                                                                                     \
    } else {                                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt)")                          \
        for (int64_t tbc = 0; tbc < T * B * C; tbc++) {                                       \
            const int64_t t = tbc / (B * C), c = tbc % C;                                     \
            const ct a = co[t * C + c], s = co[T * C + t * C + c];                            \
            const st* restrict xr = x + tbc * L; st* restrict yr = y + tbc * L;               \
            for (int64_t l = 0; l < L; l++) yr[l] = ST(LD(xr[l]) * a + s);                    \
        }                                                                                     \
    }                                                                                         \
    free(co);                                                                                 \
    return 0;                                                                                 \
}                                                                                             \
                                                                                              \
/* sdy[t, c] = sum dy, sdyx[t, c] = sum dy * (x - mean) */                                    \
int bn_bsums_##S(const st* restrict dy, const st* restrict x, const double* restrict mean,     \
                 double* restrict sdy, double* restrict sdyx,                                 \
                 int64_t T, int64_t B, int64_t C, int64_t L, int nlc, int nt) {               \
    const int64_t N = B * C * L, M = B * L;                                                   \
    if (nlc) {                                                                                \
        const double* shiftv = mean;                                                          \
        NLC_SUMS(st, LD, (double)LD(dy[o + c]), e1 * ((double)LD(x[o + c]) - sh[c]), sdy, sdyx) \
    } else {                                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt)")                          \
        for (int64_t tc = 0; tc < T * C; tc++) {                                              \
            const int64_t t = tc / C, c = tc % C;                                             \
            const double mu = mean[tc];                                                       \
            double a = 0, q = 0;                                                              \
            for (int64_t b = 0; b < B; b++) {                                                 \
                const st* restrict gb = dy + t * N + b * C * L + c * L;                       \
                const st* restrict xb = x + t * N + b * C * L + c * L;                        \
                _Pragma("omp simd reduction(+:a,q)")                                          \
                for (int64_t l = 0; l < L; l++) { double gg = LD(gb[l]); a += gg; q += gg * ((double)LD(xb[l]) - mu); } \
            }                                                                                 \
            sdy[tc] = a; sdyx[tc] = q;                                                        \
        }                                                                                     \
    }                                                                                         \
    return 0;                                                                                 \
}                                                                                             \
                                                                                              \
/* dx = (dy - (x - mean) * q[t, c]) * a[t, c] - r[t, c]; dx may be dy itself */              \
int bn_bdx_##S(const st* dy, const st* restrict x, st* dx,                                    \
               const double* restrict mean, const double* restrict qa, const double* restrict aa, \
               const double* restrict ra, int64_t T, int64_t B, int64_t C, int64_t L, int nlc, int nt) { \
    const int64_t N = B * C * L, M = B * L, TC = T * C;                                       \
    ct* co = (ct*)malloc(sizeof(ct) * 4 * TC);                                                \
    if (!co) return 1;                                                                        \
    for (int64_t k = 0; k < TC; k++) {                                                        \
        co[k] = (ct)mean[k]; co[TC + k] = (ct)qa[k]; co[2 * TC + k] = (ct)aa[k]; co[3 * TC + k] = (ct)ra[k]; } \
    if (nlc) {                                                                                \
        _Pragma("omp parallel for schedule(static) num_threads(nt)")                          \
        for (int64_t tr = 0; tr < T * M; tr++) {                                              \
            const int64_t t = tr / M, o = t * N + (tr % M) * C;                               \
            const ct* restrict mu = co + t * C; const ct* restrict q = co + TC + t * C;       \
            const ct* restrict a = co + 2 * TC + t * C; const ct* restrict r = co + 3 * TC + t * C; \
            const st* gr = dy + o; const st* restrict xr = x + o; st* dr = dx + o;            \
            for (int64_t c = 0; c < C; c++)                                                   \
                dr[c] = ST((LD(gr[c]) - (LD(xr[c]) - mu[c]) * q[c]) * a[c] - r[c]);           \
        }                                                                                     \
    } else {                                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt)")                          \
        for (int64_t tbc = 0; tbc < T * B * C; tbc++) {                                       \
            const int64_t t = tbc / (B * C), c = tbc % C, k = t * C + c;                      \
            const ct mu = co[k], q = co[TC + k], a = co[2 * TC + k], r = co[3 * TC + k];      \
            const st* gr = dy + tbc * L; const st* restrict xr = x + tbc * L; st* dr = dx + tbc * L; \
            for (int64_t l = 0; l < L; l++) dr[l] = ST((LD(gr[l]) - (LD(xr[l]) - mu) * q) * a - r); \
        }                                                                                     \
    }                                                                                         \
    free(co);                                                                                 \
    return 0;                                                                                 \
}

/* ------------------------------------------------------------------ bit planes of spike codes */
/* Entries that are multiples of 1/levels in [0, 255/levels] have exact uint8 codes x * levels. planes
   [k][pb] (plane b at planes + b * pb, pb >= ceil(n / 8)): bit e of byte j of plane b is bit b of the code
   of entry 8j + e of x, in memory order; unpack writes the entries back, code / levels. One pass each way, no codes in between: with AVX-512, 16 entries (two bytes of each
   plane) at a time for float32 and bfloat16, the same numbers as the byte at a time of the rest. */
#define DEF_PLANE_BYTES(S, st, ct, LD, ST)                                                    \
static inline void pack_byte_##S(const st* restrict x, uint8_t* restrict planes, int64_t n,  \
                                 int64_t pb, int k, ct lv, int64_t j) {                      \
    const int m = n - 8 * j < 8 ? (int)(n - 8 * j) : 8;                                       \
    unsigned q[8] = {0};                                                                      \
    for (int e = 0; e < m; e++) q[e] = (uint8_t)(LD(x[8 * j + e]) * lv + (ct)0.5);            \
    for (int b = 0; b < k; b++) {                                                             \
        unsigned byte = 0;                                                                    \
        for (int e = 0; e < 8; e++) byte |= ((q[e] >> b) & 1u) << e;                          \
        planes[b * pb + j] = (uint8_t)byte;                                                   \
    }                                                                                         \
}                                                                                             \
static inline void unpack_byte_##S(const uint8_t* restrict planes, st* restrict x, int64_t n, \
                                   int64_t pb, int k, ct r, int64_t j) {                     \
    const int m = n - 8 * j < 8 ? (int)(n - 8 * j) : 8;                                       \
    unsigned q[8] = {0};                                                                      \
    for (int b = 0; b < k; b++) {                                                             \
        const unsigned byte = planes[b * pb + j];                                             \
        for (int e = 0; e < 8; e++) q[e] |= ((byte >> e) & 1u) << b;                          \
    }                                                                                         \
    for (int e = 0; e < m; e++) x[8 * j + e] = ST((ct)q[e] * r);                              \
}

#ifdef __AVX512F__
static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline void store16_f32(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline __m512 load16_bf16(const bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void store16_bf16(bf16* p, __m512 v) {  /* f2bf's rounding (to nearest even), v finite */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#define DEF_PLANE_GROUPS(S, st)                                                               \
static inline int64_t pack_groups_##S(const st* restrict x, uint8_t* restrict planes, int64_t n, \
                                      int64_t pb, int k, float lv, int nt) {                 \
    const int64_t groups = n / 16;                                                            \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t g = 0; g < groups; g++) {                                                    \
        __m512 y = _mm512_add_ps(_mm512_mul_ps(load16_##S(x + 16 * g), _mm512_set1_ps(lv)), _mm512_set1_ps(0.5f)); \
        __m512i q = _mm512_cvttps_epi32(y);                                                   \
        for (int b = 0; b < k; b++) {                                                         \
            const __mmask16 m = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1 << b));         \
            planes[b * pb + 2 * g] = (uint8_t)m; planes[b * pb + 2 * g + 1] = (uint8_t)(m >> 8); \
        }                                                                                     \
    }                                                                                         \
    return 2 * groups;                                                                        \
}                                                                                             \
static inline int64_t unpack_groups_##S(const uint8_t* restrict planes, st* restrict x, int64_t n, \
                                        int64_t pb, int k, float r, int nt) {                \
    const int64_t groups = n / 16;                                                            \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t g = 0; g < groups; g++) {                                                    \
        __m512 v = _mm512_setzero_ps();                                                       \
        for (int b = 0; b < k; b++) {                                                         \
            const uint8_t* pl = planes + b * pb + 2 * g;                                      \
            v = _mm512_mask_add_ps(v, (__mmask16)(pl[0] | (pl[1] << 8)), v, _mm512_set1_ps((float)(1u << b))); \
        }                                                                                     \
        store16_##S(x + 16 * g, _mm512_mul_ps(v, _mm512_set1_ps(r)));                         \
    }                                                                                         \
    return 2 * groups;                                                                        \
}
DEF_PLANE_GROUPS(f32, float)
DEF_PLANE_GROUPS(bf16, bf16)
#define PACK_GROUPS_f32 j = pack_groups_f32(x, planes, n, pb, k, lv, nt);
#define PACK_GROUPS_bf16 j = pack_groups_bf16(x, planes, n, pb, k, lv, nt);
#define UNPACK_GROUPS_f32 j = unpack_groups_f32(planes, x, n, pb, k, r, nt);
#define UNPACK_GROUPS_bf16 j = unpack_groups_bf16(planes, x, n, pb, k, r, nt);
#else
#define PACK_GROUPS_f32
#define PACK_GROUPS_bf16
#define UNPACK_GROUPS_f32
#define UNPACK_GROUPS_bf16
#endif
#define PACK_GROUPS_f64
#define UNPACK_GROUPS_f64

#define DEF_PLANES(S, st, ct, LD, ST)                                                         \
DEF_PLANE_BYTES(S, st, ct, LD, ST)                                                            \
void spike_pack_##S(const st* restrict x, uint8_t* restrict planes, int64_t n, int64_t pb, int k, \
                    double levels, int nt) {                                                  \
    const ct lv = (ct)levels;                                                                 \
    const int64_t nbytes = (n + 7) / 8;                                                       \
    int64_t j = 0;                                                                            \
    PACK_GROUPS_##S                                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t i = j; i < nbytes; i++) pack_byte_##S(x, planes, n, pb, k, lv, i);           \
}                                                                                             \
void spike_unpack_##S(const uint8_t* restrict planes, st* restrict x, int64_t n, int64_t pb, int k, \
                      double levels, int nt) {                                                \
    const ct r = (ct)(1.0 / levels);                                                          \
    const int64_t nbytes = (n + 7) / 8;                                                       \
    int64_t j = 0;                                                                            \
    UNPACK_GROUPS_##S                                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t i = j; i < nbytes; i++) unpack_byte_##S(planes, x, n, pb, k, r, i);          \
}

#define ID(v) (v)
#define F32(v) ((float)(v))
#define F64(v) ((double)(v))
#define BFL(v) bf2f(v)
#define BFS(v) f2bf((float)(v))

DEF_SURR(f32, float, expf)
DEF_SURR(f64, double, exp)
DEF_SURR(bf16, float, expf)
DEF_LIF_STEPS(f32, float, float, ID, F32)
DEF_LIF_STEPS(f64, double, double, ID, F64)
DEF_LIF_STEPS(bf16, bf16, float, BFL, BFS)
DEF_LIF(f32, float, float, ID, F32)
DEF_LIF(f64, double, double, ID, F64)
DEF_LIF(bf16, bf16, float, BFL, BFS)
DEF_BNLIF(f32, float, float, ID, F32)
DEF_BNLIF(f64, double, double, ID, F64)
DEF_BNLIF(bf16, bf16, float, BFL, BFS)
DEF_BN(f32, float, float, ID, F32)
DEF_BN(f64, double, double, ID, F64)
DEF_BN(bf16, bf16, float, BFL, BFS)
DEF_PLANES(f32, float, float, ID, F32)
DEF_PLANES(f64, double, double, ID, F64)
DEF_PLANES(bf16, bf16, float, BFL, BFS)
