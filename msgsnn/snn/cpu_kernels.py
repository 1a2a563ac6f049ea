"""Fused CPU kernels for the LIF time loop and per-timestep BatchNorm, built at first use.

The kernels are plain C (OpenMP, compiled with the system's ``gcc``/``cc`` for the
host CPU, loaded with ``ctypes``): no torch headers, so the build takes a few
seconds and needs nothing beyond a C compiler. If there is no compiler, the build
fails or a self-test disagrees with torch, :func:`get` returns ``None`` and the
callers use their torch-operator paths instead. ``MSGSNN_CPU_KERNELS=0`` turns the
kernels off; the shared library is cached in ``$MSGSNN_CACHE`` (default
``~/.cache/msgsnn``), keyed by source, compiler flags and CPU.

Layouts. Both kernels see a ``[T, B, C, L]`` tensor (``L`` = the product of the
trailing dims) whose timesteps are dense blocks of ``N = B*C*L`` elements, stored
either contiguous (``ncl``) or channels-last (``nlc``: ``[T, B, L, C]`` in memory,
what channels-last convolutions on the folded batch produce).

MSG mask. The element mask must be the one the reference draws with
``torch.rand(shape) >= p`` per timestep, T-1 first. torch's CPU generator is an
MT19937 whose state ``torch.get_rng_state()`` exposes; the kernel draws the same
32-bit stream from that state (SIMD-friendly, in bulk), turns it into keep bits in
the tensor's physical order, and hands the advanced state back with
``torch.set_rng_state``. The bits live only during the layer's backward.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import numpy as np
import torch

_SOURCE = r"""
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

/* bits[t * rowbytes ...]: bit p = keep for physical element p at timestep t. mode 0 element, 1 channel, 2 timestep. */
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

/* g[i] = 0 where bit i of row is clear (row starts at a byte boundary): AVX-512 masked moves
   where the compiler targets it, bit tests for the rest */
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#define KEEP_ZERO_REST(g, row, i, n) for (; i < n; i++) if (!((row[i >> 3] >> (i & 7)) & 1)) g[i] = 0
static void keep_zero_float(float* restrict g, const uint8_t* restrict row, int n) {
    int i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        __mmask16 m = (__mmask16)(row[i >> 3] | (row[(i >> 3) + 1] << 8));
        _mm512_storeu_ps(g + i, _mm512_maskz_mov_ps(m, _mm512_loadu_ps(g + i)));
    }
#endif
    KEEP_ZERO_REST(g, row, i, n);
}
static void keep_zero_double(double* restrict g, const uint8_t* restrict row, int n) {
    int i = 0;
#ifdef __AVX512F__
    for (; i + 8 <= n; i += 8)
        _mm512_storeu_pd(g + i, _mm512_maskz_mov_pd((__mmask8)row[i >> 3], _mm512_loadu_pd(g + i)));
#endif
    KEEP_ZERO_REST(g, row, i, n);
}

/* ------------------------------------------------------------------ LIF */

#define ABSV(v) ((v) < 0 ? -(v) : (v))

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
    } else {                                                                                  \
        const ct w = (ct)(1.0 / alpha);                                                       \
        for (int i = 0; i < n; i++) g[i] = ABSV(x[i]) < w ? a : (ct)0;                         \
    }                                                                                         \
}

#define DEF_LIF(S, st, ct, LD, ST)                                                            \
void lif_fwd_##S(const st* restrict x, st* restrict s, st* restrict h, int64_t T, int64_t N,   \
                 double tau_, double vth_, int hard, int nt) {                                \
    const ct tau = (ct)tau_, vth = (ct)vth_;                                                  \
    const int64_t nb = (N + BLK - 1) / BLK;                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t b = 0; b < nb; b++) {                                                        \
        const int64_t p0 = b * BLK;                                                           \
        const int n = (int)(N - p0 < BLK ? N - p0 : BLK);                                     \
        ct v[BLK];                                                                            \
        for (int i = 0; i < n; i++) v[i] = 0;                                                 \
        for (int64_t t = 0; t < T; t++) {                                                     \
            const st* restrict xt = x + t * N + p0;                                           \
            st* restrict sp = s + t * N + p0;                                                 \
            st* restrict hp = h ? h + t * N + p0 : 0;                                         \
            if (hard && hp) for (int i = 0; i < n; i++) {                                     \
                ct hv = LD(ST(v[i] + (LD(xt[i]) - v[i]) / tau)); int f = hv >= vth;          \
                sp[i] = ST((ct)f); hp[i] = ST(hv); v[i] = f ? (ct)0 : hv; }                   \
            else if (hard) for (int i = 0; i < n; i++) {                                      \
                ct hv = LD(ST(v[i] + (LD(xt[i]) - v[i]) / tau)); int f = hv >= vth;          \
                sp[i] = ST((ct)f); v[i] = f ? (ct)0 : hv; }                                   \
            else if (hp) for (int i = 0; i < n; i++) {                                        \
                ct hv = LD(ST(v[i] + (LD(xt[i]) - v[i]) / tau)); ct f = (ct)(hv >= vth);     \
                sp[i] = ST(f); hp[i] = ST(hv); v[i] = LD(ST(hv - vth * f)); }                 \
            else for (int i = 0; i < n; i++) {                                                \
                ct hv = LD(ST(v[i] + (LD(xt[i]) - v[i]) / tau)); ct f = (ct)(hv >= vth);     \
                sp[i] = ST(f); v[i] = LD(ST(hv - vth * f)); }                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
void lif_bwd_##S(const st* restrict gs, const st* restrict h, st* restrict gx,                \
                 const uint8_t* restrict bits, int64_t rowbytes, int64_t T, int64_t N,         \
                 double tau_, double vth_, int hard, int detach, int sid, double alpha,        \
                 int fill, double keep_div, int nt) {                                         \
    const ct tau = (ct)tau_, vth = (ct)vth_, leak = (ct)(1.0 - 1.0 / tau_);                   \
    const ct kdiv = (ct)keep_div;                                                             \
    const int64_t nb = (N + BLK - 1) / BLK;                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t b = 0; b < nb; b++) {                                                        \
        const int64_t p0 = b * BLK;                                                           \
        const int n = (int)(N - p0 < BLK ? N - p0 : BLK);                                     \
        ct gv[BLK], xa[BLK], ha[BLK], g[BLK], fl[BLK];                                        \
        uint8_t kb[BLK + 8];                                                                  \
        for (int i = 0; i < n; i++) gv[i] = 0;                                                \
        for (int64_t t = T - 1; t >= 0; t--) {                                                \
            const st* restrict hp = h + t * N + p0;                                           \
            const st* restrict gp = gs + t * N + p0;                                          \
            st* restrict op = gx + t * N + p0;                                                \
            for (int i = 0; i < n; i++) { ha[i] = LD(hp[i]); xa[i] = ha[i] - vth; }           \
            surr_##S(xa, g, n, sid, alpha);                                                   \
            if (bits) {                                                                       \
                const uint8_t* row = bits + t * rowbytes + (p0 >> 3);                         \
                if (keep_div != 0) for (int i = 0; i < n; i++) g[i] = g[i] / kdiv;            \
                if (fill < 0) keep_zero_##ct(g, row, n);                                      \
                else {                                                                        \
                    for (int j = 0; j < (n + 7) / 8; j++) memcpy(kb + 8 * j, &LUT[row[j]], 8); \
                    surr_##S(xa, fl, n, fill, alpha);                                         \
                    for (int i = 0; i < n; i++) g[i] = kb[i] ? g[i] : fl[i];                  \
                }                                                                             \
            }                                                                                 \
            if (hard && !detach) for (int i = 0; i < n; i++) {                                \
                ct s = LD(gp[i]) - gv[i] * ha[i];                                             \
                ct gh = (xa[i] < 0 ? gv[i] : (ct)0) + s * g[i];                               \
                op[i] = ST(gh / tau); gv[i] = gh * leak; }                                    \
            else if (hard) for (int i = 0; i < n; i++) {                                      \
                ct gh = (xa[i] < 0 ? gv[i] : (ct)0) + LD(gp[i]) * g[i];                       \
                op[i] = ST(gh / tau); gv[i] = gh * leak; }                                    \
            else if (!detach) for (int i = 0; i < n; i++) {                                   \
                ct s = LD(gp[i]) - vth * gv[i];                                               \
                ct gh = gv[i] + s * g[i];                                                     \
                op[i] = ST(gh / tau); gv[i] = gh * leak; }                                    \
            else for (int i = 0; i < n; i++) {                                                \
                ct gh = gv[i] + LD(gp[i]) * g[i];                                             \
                op[i] = ST(gh / tau); gv[i] = gh * leak; }                                    \
        }                                                                                     \
    }                                                                                         \
}

/* ------------------------------------------------------------------ per-timestep BatchNorm */
/* x: [T][B][C][L] (nlc = 0) or [T][B][L][C] (nlc = 1); statistics per (t, c) over B*L, accumulated in
   double and shifted by the first sample of each (t, c). One parallel region per call: barriers are
   expensive when the machine is oversubscribed. */

#include <omp.h>

/* per-thread partial sums for nlc: rows (t, r) split statically, accumulators [T][C] per thread */
#define NLC_SUMS(st, LD, EXPR1, EXPR2, OUT1, OUT2)                                            \
    {                                                                                         \
        double* part = (double*)calloc((size_t)(2 * nt * T * C), sizeof(double));             \
        if (!part) return 1;                                                                  \
        _Pragma("omp parallel num_threads(nt)")                                               \
        {                                                                                     \
            double* s1 = part + (int64_t)omp_get_thread_num() * 2 * T * C;                    \
            double* s2 = s1 + T * C;                                                          \
            _Pragma("omp for schedule(static)")                                               \
            for (int64_t tr = 0; tr < T * M; tr++) {                                          \
                const int64_t t = tr / M, o = t * N + (tr % M) * C;                           \
                double* restrict a1 = s1 + t * C; double* restrict a2 = s2 + t * C;           \
                const double* restrict sh = shiftv + t * C;                                   \
                for (int64_t c = 0; c < C; c++) {                                             \
                    double e1 = (EXPR1), e2 = (EXPR2); a1[c] += e1; a2[c] += e2; }            \
            }                                                                                 \
        }                                                                                     \
        for (int64_t k = 0; k < T * C; k++) {                                                 \
            double u = 0, w = 0;                                                              \
            for (int i = 0; i < nt; i++) { u += part[i * 2 * T * C + k]; w += part[i * 2 * T * C + T * C + k]; } \
            OUT1[k] = u; OUT2[k] = w; }                                                       \
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
/* dx = (dy - (x - mean) * q[t, c]) * a[t, c] - r[t, c] */                                    \
int bn_bdx_##S(const st* restrict dy, const st* restrict x, st* restrict dx,                  \
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
            const st* restrict gr = dy + o; const st* restrict xr = x + o; st* restrict dr = dx + o; \
            for (int64_t c = 0; c < C; c++)                                                   \
                dr[c] = ST((LD(gr[c]) - (LD(xr[c]) - mu[c]) * q[c]) * a[c] - r[c]);           \
        }                                                                                     \
    } else {                                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(nt)")                          \
        for (int64_t tbc = 0; tbc < T * B * C; tbc++) {                                       \
            const int64_t t = tbc / (B * C), c = tbc % C, k = t * C + c;                      \
            const ct mu = co[k], q = co[TC + k], a = co[2 * TC + k], r = co[3 * TC + k];      \
            const st* restrict gr = dy + tbc * L; const st* restrict xr = x + tbc * L; st* restrict dr = dx + tbc * L; \
            for (int64_t l = 0; l < L; l++) dr[l] = ST((LD(gr[l]) - (LD(xr[l]) - mu) * q) * a - r); \
        }                                                                                     \
    }                                                                                         \
    free(co);                                                                                 \
    return 0;                                                                                 \
}

/* ------------------------------------------------------------------ spike codes */
/* entries that are multiples of 1/levels in [0, 255/levels] <-> uint8 codes (exact) */

#define DEF_CODES(S, st, ct, LD, ST)                                                          \
void spike_encode_##S(const st* restrict x, uint8_t* restrict q, int64_t n, double levels, int nt) { \
    const ct k = (ct)levels;                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t i = 0; i < n; i++) q[i] = (uint8_t)(LD(x[i]) * k + (ct)0.5);                 \
}                                                                                             \
void spike_decode_##S(const uint8_t* restrict q, st* restrict x, int64_t n, double levels, int nt) { \
    const ct r = (ct)(1.0 / levels);                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                              \
    for (int64_t i = 0; i < n; i++) x[i] = ST((ct)q[i] * r);                                  \
}

#define ID(v) (v)
#define F32(v) ((float)(v))
#define F64(v) ((double)(v))
#define BFL(v) bf2f(v)
#define BFS(v) f2bf((float)(v))

DEF_SURR(f32, float, expf)
DEF_SURR(f64, double, exp)
DEF_SURR(bf16, float, expf)
DEF_LIF(f32, float, float, ID, F32)
DEF_LIF(f64, double, double, ID, F64)
DEF_LIF(bf16, bf16, float, BFL, BFS)
DEF_BN(f32, float, float, ID, F32)
DEF_BN(f64, double, double, ID, F64)
DEF_BN(bf16, bf16, float, BFL, BFS)
DEF_CODES(f32, float, float, ID, F32)
DEF_CODES(f64, double, double, ID, F64)
DEF_CODES(bf16, bf16, float, BFL, BFS)
"""

_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
_SURROGATE_IDS = {"piecewise_linear": 0, "arctan": 1, "sigmoid": 2, "rectangular": 3}
_MASK_MODES = {"element": 0, "channel": 1, "timestep": 2}
_STATE_BYTES = 5056

_lock = threading.Lock()
_kernels: "CpuKernels | None | bool" = False  # False: not tried yet


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compile(cc: str, flags: list[str], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        src = os.path.join(tmp, "msgsnn_kernels.c")
        out = os.path.join(tmp, "msgsnn_kernels.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        proc = subprocess.run([cc, *flags, src, "-o", out, "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, path)  # atomic: concurrent builders all end with a complete file


def _load() -> "CpuKernels":
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]
    key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _cpu_key()]).encode()).hexdigest()[:16]
    cache = os.environ.get("MSGSNN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "msgsnn")
    name = f"msgsnn_kernels_{key}.so"
    path = os.path.join(cache, name)
    if not os.path.exists(path):
        try:
            _compile(cc, flags, path)
        except OSError:  # cache not writable: build in a per-user temporary folder instead
            path = os.path.join(tempfile.gettempdir(), f"msgsnn-{os.getuid() if hasattr(os, 'getuid') else 0}", name)
            if not os.path.exists(path):
                _compile(cc, flags, path)
    return CpuKernels(ctypes.CDLL(path))


def get() -> "CpuKernels | None":
    """The loaded kernels, or ``None`` when they are switched off or could not be built."""
    global _kernels
    if _kernels is False:
        with _lock:
            if _kernels is False:
                if os.environ.get("MSGSNN_CPU_KERNELS", "1") in ("0", "false", "off", "no"):
                    _kernels = None
                else:
                    try:
                        k = _load()
                        k.self_test()
                        _kernels = k
                    except Exception as err:  # noqa: BLE001 - any failure means: use the torch path
                        warnings.warn(f"msgsnn: fused CPU kernels unavailable, using torch operators ({err})",
                                      RuntimeWarning, stacklevel=2)
                        _kernels = None
    return _kernels or None


def step_layout(x: torch.Tensor) -> str | None:
    """``ncl`` if each timestep of ``x [T, B, C, ...]`` is contiguous, ``nlc`` if channels-last, else None."""
    if x.is_contiguous():
        return "ncl"
    if x.dim() == 5:
        T, B, C, H, W = x.shape
        expected = (B * H * W * C, H * W * C, 1, W * C, C)
        if all(s == e or n == 1 for s, e, n in zip(x.stride(), expected, x.shape)):
            return "nlc"
    return None


def _bcl(x: torch.Tensor) -> tuple[int, int, int, int]:
    T, B = x.shape[0], x.shape[1]
    C = x.shape[2] if x.dim() > 2 else 1
    L = 1
    for n in x.shape[3:]:
        L *= n
    return T, B, C, L


def keep_threshold(p: float) -> int:
    """Integer threshold u24 with ``rand() >= p`` (float32 compare) <=> ``(u32 & 0xffffff) >= u24``."""
    p32 = float(np.float32(p))
    return int(np.ceil(p32 * 2**24))


class BufferPool:
    """Recycles the large output buffers of these kernels instead of returning them to the OS.

    A fresh large CPU tensor costs a page fault per 4 KiB on first touch (glibc maps
    big blocks and unmaps them on free), about as much as the kernel that fills it.
    Training repeats the same shapes every step, so buffers handed out here come
    back to the pool when torch frees their storage (the storage keeps a small
    owner object alive whose finaliser returns the block) and serve the next
    request of the same size: the membranes and gradients freed in one step's
    backward become the next step's activations. Buffers freed while autograd
    records a graph (a training forward) go back to the system instead: kept, they
    would only raise the step's peak. Like CUDA's caching allocator, free blocks
    stay resident; :meth:`clear` drops them, and at most ``limit`` bytes are kept.
    """

    MIN_BYTES = 1 << 20

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cached = 0
        self._free: dict[int, list[torch.Tensor]] = {}
        self._types: dict[int, type] = {}
        self._lock = threading.Lock()

    def _lease_type(self, nbytes: int) -> type:
        kind = self._types.get(nbytes)
        if kind is None:
            pool = self

            def release(lease) -> None:
                block = lease.__dict__.pop("block", None)
                if block is not None:
                    pool._give_back(block)

            kind = type(f"_Lease{nbytes}", (ctypes.c_uint8 * nbytes,), {"__del__": release})
            self._types[nbytes] = kind
        return kind

    def _give_back(self, block: torch.Tensor) -> None:
        nbytes = block.numel()
        if torch.is_grad_enabled():
            return  # freed while building a graph: the next step's backward refills the pool
        with self._lock:
            if self.cached + nbytes <= self.limit:
                self._free.setdefault(nbytes, []).append(block)
                self.cached += nbytes

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """Uninitialised tensor with the shape, strides and dtype of the dense CPU tensor ``x``."""
        return self.empty_strided(x.shape, x.stride(), x.dtype)

    def empty_strided(self, shape, stride, dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised dense CPU tensor; ``shape``/``stride`` must cover their storage exactly."""
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * dtype.itemsize
        if nbytes < self.MIN_BYTES:
            return torch.empty_strided(shape, stride, dtype=dtype)
        with self._lock:
            blocks = self._free.get(nbytes)
            block = blocks.pop() if blocks else None
            if block is not None:
                self.cached -= nbytes
        if block is None:
            block = torch.empty(nbytes, dtype=torch.uint8)
        lease = self._lease_type(nbytes).from_address(block.data_ptr())
        lease.block = block
        raw = torch.from_numpy(np.frombuffer(lease, dtype=np.uint8))
        return raw.view(dtype).as_strided(shape, stride)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.cached = 0


def _pool_limit() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(os.environ.get("MSGSNN_CPU_POOL_MB", total // 4 >> 20)) << 20


pool = BufferPool(_pool_limit())


def empty_cache() -> None:
    """Return the free buffers kept by the fused CPU kernels to the system."""
    pool.clear()


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _DTYPES and step_layout(x) is not None


class CpuKernels:
    """Typed wrappers around the shared library; every tensor argument must satisfy :func:`supports`."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self._local = threading.local()
        i64, dbl, i32, vp, u32 = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32
        lib.msg_draw_mask.argtypes = [vp, vp, i64, i64, i64, i64, i64, i32, i32, u32, vp]
        lib.msg_draw_mask.restype = None
        for s in _DTYPES.values():
            getattr(lib, f"lif_fwd_{s}").argtypes = [vp, vp, vp, i64, i64, dbl, dbl, i32, i32]
            getattr(lib, f"lif_bwd_{s}").argtypes = [vp, vp, vp, vp, i64, i64, i64, dbl, dbl, i32, i32, i32, dbl, i32, dbl, i32]
            getattr(lib, f"bn_stats_{s}").argtypes = [vp, vp, vp, i64, i64, i64, i64, i32, i32]
            getattr(lib, f"bn_apply_{s}").argtypes = [vp, vp, vp, vp, i64, i64, i64, i64, i32, i32]
            getattr(lib, f"bn_bsums_{s}").argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, i64, i32, i32]
            getattr(lib, f"bn_bdx_{s}").argtypes = [vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i32, i32]
            getattr(lib, f"spike_encode_{s}").argtypes = [vp, vp, i64, dbl, i32]
            getattr(lib, f"spike_decode_{s}").argtypes = [vp, vp, i64, dbl, i32]
            for name in ("lif_fwd", "lif_bwd", "spike_encode", "spike_decode"):
                getattr(lib, f"{name}_{s}").restype = None
            for name in ("bn_stats", "bn_apply", "bn_bsums", "bn_bdx"):
                getattr(lib, f"{name}_{s}").restype = i32

    # ---------------------------------------------------------------- LIF

    def lif_forward(self, x: torch.Tensor, tau: float, v_threshold: float, hard: bool, keep_membrane: bool):
        """Spikes and (if asked) the pre-spike membrane ``H``, both laid out like ``x``."""
        T, N = x.shape[0], x[0].numel()
        spikes = pool.empty_like(x)
        membrane = pool.empty_like(x) if keep_membrane else None
        if x.numel():
            getattr(self.lib, f"lif_fwd_{_DTYPES[x.dtype]}")(
                _ptr(x), _ptr(spikes), _ptr(membrane), T, N, tau, v_threshold, int(hard), torch.get_num_threads())
        return spikes, membrane

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """A per-thread byte buffer of at least ``nbytes``, kept between calls."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf

    def draw_mask(self, like: torch.Tensor, mode: str, p: float) -> tuple[torch.Tensor, int]:
        """Keep bits ``[T, ceil(N/8)]`` for ``like [T, B, C, ...]``: the reference's draws, timestep T-1 first."""
        T, B, C, L = _bcl(like)
        rowbytes = (B * C * L + 7) // 8
        bits = pool.empty_strided((T * rowbytes,), (1,), torch.uint8)
        scratch = self._scratch(C * L + L)
        state = torch.get_rng_state()
        self.lib.msg_draw_mask(_ptr(state), _ptr(bits), rowbytes, T, B, C, L,
                               int(step_layout(like) == "nlc"), _MASK_MODES[mode], keep_threshold(p), _ptr(scratch))
        torch.set_rng_state(state)
        return bits, rowbytes

    def lif_backward(self, grad: torch.Tensor, membrane: torch.Tensor, tau: float, v_threshold: float,
                     spec, hard: bool, detach_reset: bool) -> torch.Tensor:
        T, N = membrane.shape[0], membrane[0].numel()
        if grad.dtype != membrane.dtype or grad.stride() != membrane.stride():
            grad = pool.empty_like(membrane).copy_(grad)
        out = pool.empty_like(membrane)
        if not membrane.numel():
            return out
        bits, rowbytes = None, 0
        if spec.mask_p > 0:
            bits, rowbytes = self.draw_mask(membrane, spec.mask_mode, spec.mask_p)
        fill = -1 if spec.mask_fill == "zero" else _SURROGATE_IDS[spec.mask_fill]
        keep_div = (1.0 - spec.mask_p) if (spec.rescale and spec.mask_p < 1.0) else 0.0
        getattr(self.lib, f"lif_bwd_{_DTYPES[membrane.dtype]}")(
            _ptr(grad), _ptr(membrane), _ptr(out), _ptr(bits), rowbytes, T, N, tau, v_threshold, int(hard),
            int(detach_reset), _SURROGATE_IDS[spec.surrogate], spec.alpha, fill, keep_div, torch.get_num_threads())
        return out

    # ---------------------------------------------------------------- BatchNorm per timestep

    def bn_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Biased mean and variance per (t, c), float64 ``[T, C]``."""
        T, B, C, L = _bcl(x)
        mean = torch.empty(T, C, dtype=torch.float64)
        var = torch.empty(T, C, dtype=torch.float64)
        getattr(self.lib, f"bn_stats_{_DTYPES[x.dtype]}")(
            _ptr(x), _ptr(mean), _ptr(var), T, B, C, L, int(step_layout(x) == "nlc"), torch.get_num_threads())
        return mean, var

    def bn_apply(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        T, B, C, L = _bcl(x)
        y = pool.empty_like(x)
        getattr(self.lib, f"bn_apply_{_DTYPES[x.dtype]}")(
            _ptr(x), _ptr(y), _ptr(scale.contiguous()), _ptr(shift.contiguous()), T, B, C, L,
            int(step_layout(x) == "nlc"), torch.get_num_threads())
        return y

    def bn_backward_sums(self, dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor):
        T, B, C, L = _bcl(x)
        sdy = torch.empty(T, C, dtype=torch.float64)
        sdyx = torch.empty(T, C, dtype=torch.float64)
        getattr(self.lib, f"bn_bsums_{_DTYPES[x.dtype]}")(
            _ptr(dy), _ptr(x), _ptr(mean), _ptr(sdy), _ptr(sdyx), T, B, C, L,
            int(step_layout(x) == "nlc"), torch.get_num_threads())
        return sdy, sdyx

    def bn_backward_input(self, dy, x, mean, q, a, r) -> torch.Tensor:
        T, B, C, L = _bcl(x)
        dx = pool.empty_like(x)
        getattr(self.lib, f"bn_bdx_{_DTYPES[x.dtype]}")(
            _ptr(dy), _ptr(x), _ptr(dx), _ptr(mean), _ptr(q.contiguous()), _ptr(a.contiguous()), _ptr(r.contiguous()),
            T, B, C, L, int(step_layout(x) == "nlc"), torch.get_num_threads())
        return dx

    # ---------------------------------------------------------------- spike codes

    def encode(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """uint8 codes ``x * levels`` of a dense tensor whose entries are multiples of ``1 / levels``."""
        codes = torch.empty_like(x, dtype=torch.uint8)
        getattr(self.lib, f"spike_encode_{_DTYPES[x.dtype]}")(_ptr(x), _ptr(codes), x.numel(), float(levels),
                                                             torch.get_num_threads())
        return codes

    def decode(self, codes: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
        x = pool.empty_strided(codes.shape, codes.stride(), dtype)
        getattr(self.lib, f"spike_decode_{_DTYPES[dtype]}")(_ptr(codes), _ptr(x), codes.numel(), float(levels),
                                                           torch.get_num_threads())
        return x

    # ---------------------------------------------------------------- self-test

    def self_test(self) -> None:
        """The mask stream must be torch's own; a mismatch disables the kernels (callers fall back)."""
        saved = torch.get_rng_state()
        if saved.numel() != _STATE_BYTES:
            raise RuntimeError(f"unexpected torch CPU generator state size {saved.numel()}")
        try:
            for seed, p, shape in ((3, 0.5, (3, 2, 5, 7, 9)), (11, 0.3, (2, 1, 700)), (5, 0.77, (4, 2, 16, 3, 5))):
                x = torch.zeros(shape)
                if len(shape) == 5:
                    x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape)
                torch.manual_seed(seed)
                torch.rand(5)  # start mid-block
                bits, rowbytes = self.draw_mask(x, "element", p)
                after = torch.rand(3)
                torch.manual_seed(seed)
                torch.rand(5)
                ref = torch.stack([torch.rand(shape[1:]) >= p for _ in range(shape[0])][::-1])
                ref_after = torch.rand(3)
                phys = ref if step_layout(x) == "ncl" else ref.permute(0, 1, 3, 4, 2)
                phys = phys.reshape(shape[0], -1)
                got = torch.from_numpy(np.unpackbits(bits.view(shape[0], rowbytes).numpy(), axis=1, bitorder="little"))
                got = got[:, : phys.shape[1]].bool()
                if not torch.equal(got, phys) or not torch.equal(after, ref_after):
                    raise RuntimeError("the MSG mask stream differs from torch.rand")
        finally:
            torch.set_rng_state(saved)
