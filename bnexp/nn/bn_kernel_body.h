/* The kernels for one element type: included by bn_kernel.c once per type, with T the element type and
 * NAME(f) the function name for it. See bn_kernel.c for the layout, the accuracy argument, the threading
 * and why.
 *
 * Every entry point works channel by channel: a thread owns the channels [c0, c1) for the whole call (their
 * statistics, their coefficients and their outputs, block by block), so threads need no barrier between
 * passes and each channel's sums are added in the same order whatever the number of threads. (N, C) data
 * is the exception: its outputs are split by rows after one barrier (bn_kernel.c). */

#define ROWS 4   /* (N, C) data: rows handled together, so each per-channel value is loaded once per 4 */
#define LANES 16 /* NC* data: independent partial sums per plane, so the additions do not wait on each other */
/* A pass over a block of channels leaves that block of its inputs in cache for the next pass when the
 * block is at most this large per full-size input (backward reads two: g and x), well within L2. */
#define BLOCK_BYTES (512 << 10)

/* Σ(x−k) and Σ(x−k)² over one plane of L values, in double. */
static inline void NAME(plane_sums)(const T *restrict p, int64_t L, double k, double *s, double *q)
{
    double sv[LANES] = {0}, qv[LANES] = {0};
    int64_t l = 0;
    for (; l + LANES <= L; l += LANES) {
        _Pragma("omp simd")
        for (int j = 0; j < LANES; j++) {
            double d = (double)p[l + j] - k;
            sv[j] += d;
            qv[j] += d * d;
        }
    }
    double ss = 0.0, qq = 0.0;
    for (; l < L; l++) {
        double d = (double)p[l] - k;
        ss += d;
        qq += d * d;
    }
    for (int j = 0; j < LANES; j++) { ss += sv[j]; qq += qv[j]; }
    *s += ss;
    *q += qq;
}

/* Σg and Σg·(x−μ) over one plane, in double. */
static inline void NAME(plane_grad_sums)(const T *restrict g, const T *restrict x, int64_t L, double mu,
                                         double *sg, double *sgd)
{
    double av[LANES] = {0}, dv[LANES] = {0};
    int64_t l = 0;
    for (; l + LANES <= L; l += LANES) {
        _Pragma("omp simd")
        for (int j = 0; j < LANES; j++) {
            double gg = (double)g[l + j];
            av[j] += gg;
            dv[j] += gg * ((double)x[l + j] - mu);
        }
    }
    double a = 0.0, d = 0.0;
    for (; l < L; l++) {
        double gg = (double)g[l];
        a += gg;
        d += gg * ((double)x[l] - mu);
    }
    for (int j = 0; j < LANES; j++) { a += av[j]; d += dv[j]; }
    *sg += a;
    *sgd += d;
}

/* y = (x − μ)·k + β over channels [c0, c1) of (N, C, L) data, per-channel μ, k, β. */
static void NAME(affine)(const T *restrict x, T *restrict y, int64_t N, int64_t C, int64_t L, int64_t c0,
                         int64_t c1, const T *restrict mu, const T *restrict k, const T *restrict beta)
{
    if (L == 1) {
        int64_t n = 0;
        for (; n + ROWS <= N; n += ROWS) {
            const T *x0 = x + n * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
            T *y0 = y + n * C, *y1 = y0 + C, *y2 = y1 + C, *y3 = y2 + C;
            _Pragma("omp simd")
            for (int64_t c = c0; c < c1; c++) {
                const T m = mu[c], kk = k[c], b = beta[c];
                y0[c] = (x0[c] - m) * kk + b;
                y1[c] = (x1[c] - m) * kk + b;
                y2[c] = (x2[c] - m) * kk + b;
                y3[c] = (x3[c] - m) * kk + b;
            }
        }
        for (; n < N; n++) {
            const T *xr = x + n * C;
            T *yr = y + n * C;
            _Pragma("omp simd")
            for (int64_t c = c0; c < c1; c++) yr[c] = (xr[c] - mu[c]) * k[c] + beta[c];
        }
        return;
    }
    for (int64_t n = 0; n < N; n++) {
        for (int64_t c = c0; c < c1; c++) {
            const T *xp = x + (n * C + c) * L;
            T *yp = y + (n * C + c) * L;
            const T m = mu[c], kk = k[c], b = beta[c];
            _Pragma("omp simd")
            for (int64_t l = 0; l < L; l++) yp[l] = (xp[l] - m) * kk + b;
        }
    }
}

/* Channels per block for NC* data: as many as keep one full-size input's block (N·L values per channel)
 * within BLOCK_BYTES; all C when the whole input fits, or when not even one channel does (a block would
 * then gain nothing, and backward's g and x blocks together would overflow L2: measured slower). */
static int64_t NAME(channel_block)(int64_t N, int64_t C, int64_t L)
{
    const int64_t cb = BLOCK_BYTES / (N * L * (int64_t)sizeof(T));
    return cb < 1 || cb > C ? C : cb;
}

/* Training forward statistics over channels [c0, c1): the sums, mean, variance, invstd, running
 * statistics and the coefficients of y; acc holds 3·C doubles, coef 2·C values of T (k, then β). */
static void NAME(forward_stats)(const T *restrict x, int64_t N, int64_t C, int64_t L, int64_t c0, int64_t c1,
                                const T *w, const T *b, double eps, int unbiased, T *stats, T *run_mean,
                                T *run_var, double factor, double *acc, T *coef)
{
    const double m = (double)N * (double)L;
    double *s = acc, *q = acc + C, *shift = acc + 2 * C;
    T *mean = stats, *var = stats + C, *invstd = stats + 2 * C, *k = coef, *beta = coef + C;
    for (int64_t c = c0; c < c1; c++) { s[c] = 0.0; q[c] = 0.0; shift[c] = (double)x[c * L]; }
    if (L == 1) {
        int64_t n = 0;
        for (; n + ROWS <= N; n += ROWS) {
            const T *x0 = x + n * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
            _Pragma("omp simd")
            for (int64_t c = c0; c < c1; c++) {
                const double sh = shift[c];
                const double d0 = (double)x0[c] - sh, d1 = (double)x1[c] - sh;
                const double d2 = (double)x2[c] - sh, d3 = (double)x3[c] - sh;
                s[c] += (d0 + d1) + (d2 + d3);
                q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
            }
        }
        for (; n < N; n++) {
            const T *xr = x + n * C;
            _Pragma("omp simd")
            for (int64_t c = c0; c < c1; c++) {
                const double d = (double)xr[c] - shift[c];
                s[c] += d;
                q[c] += d * d;
            }
        }
    } else {
        for (int64_t n = 0; n < N; n++)
            for (int64_t c = c0; c < c1; c++) NAME(plane_sums)(x + (n * C + c) * L, L, shift[c], &s[c], &q[c]);
    }
    for (int64_t c = c0; c < c1; c++) {
        const double dm = s[c] / m;
        double v = q[c] / m - dm * dm;
        if (v < 0.0) v = 0.0;
        const double mu = shift[c] + dm;
        const double is = 1.0 / sqrt((unbiased ? v * m / (m - 1.0) : v) + eps);
        mean[c] = (T)mu;
        var[c] = (T)v;
        invstd[c] = (T)is;
        if (run_mean) {
            run_mean[c] += (T)(factor * (mu - (double)run_mean[c]));
            run_var[c] += (T)(factor * (v * m / (m - 1.0) - (double)run_var[c]));
        }
        k[c] = (T)((double)invstd[c] * (w ? (double)w[c] : 1.0));
        beta[c] = b ? b[c] : (T)0;
    }
}

/* Training forward over channels [c0, c1), block by block (channel_block): a block's statistics, then its
 * y, while its part of x is still in cache from the first pass. */
static void NAME(train_forward_range)(const T *restrict x, T *restrict y, int64_t N, int64_t C, int64_t L,
                                      int64_t c0, int64_t c1, const T *w, const T *b, double eps, int unbiased,
                                      T *stats, T *run_mean, T *run_var, double factor, double *acc, T *coef)
{
    const int64_t cb = NAME(channel_block)(N, C, L);
    for (int64_t b0 = c0; b0 < c1; b0 += cb) {
        const int64_t b1 = b0 + cb < c1 ? b0 + cb : c1;
        NAME(forward_stats)(x, N, C, L, b0, b1, w, b, eps, unbiased, stats, run_mean, run_var, factor, acc, coef);
        NAME(affine)(x, y, N, C, L, b0, b1, stats, coef, coef + C);
    }
}

/* Training forward. stats (3·C values of T) receives mean, biased variance and invstd; the running
 * buffers (NULL when not tracked) move toward the batch's mean and unbiased variance by `factor`.
 * Returns 0, or -1 when scratch memory could not be had. */
int NAME(bn_train_forward)(const T *restrict x, T *restrict y, int64_t N, int64_t C, int64_t L,
                           const T *w, const T *b, double eps, int unbiased, T *stats, T *run_mean,
                           T *run_var, double factor)
{
    double *acc = malloc(sizeof(double) * 3 * (size_t)C);
    T *coef = malloc(sizeof(T) * 2 * (size_t)C);
    if (!acc || !coef) { free(acc); free(coef); return -1; }
    if (L == 1) {
        /* (N, C) data: y by rows, once every channel's coefficients are known. Not in blocks of channels:
         * a block would be a band of columns, and with C a power of two its rows fall on a few cache sets
         * and evict each other before the second pass (measured slower). */
        BN_PARALLEL_CHANNELS_THEN_ROWS(N * C, C, N,
            NAME(forward_stats)(x, N, C, L, c0, c1, w, b, eps, unbiased, stats, run_mean, run_var, factor, acc,
                                coef),
            NAME(affine)(x + r0 * C, y + r0 * C, r1 - r0, C, 1, 0, C, stats, coef, coef + C));
    } else {
        BN_PARALLEL_CHANNELS(N * C * L, C,
            NAME(train_forward_range)(x, y, N, C, L, c0, c1, w, b, eps, unbiased, stats, run_mean, run_var,
                                      factor, acc, coef));
    }
    free(acc);
    free(coef);
    return 0;
}

/* Training-mode forward of G batches of N rows stacked along dim 0, each normalized by its own statistics
 * and none of them updating running statistics (the probes' grouped pass, bnexp.probes). stats receives,
 * per batch, its 3·C values as bn_train_forward writes them. */
int NAME(bn_grouped_forward)(const T *x, T *y, int64_t G, int64_t N, int64_t C, int64_t L, const T *w,
                             const T *b, double eps, int unbiased, T *stats)
{
    const int64_t per = N * C * L;
    for (int64_t g = 0; g < G; g++) {
        int rc = NAME(bn_train_forward)(x + g * per, y + g * per, N, C, L, w, b, eps, unbiased,
                                        stats + g * 3 * C, NULL, NULL, 0.0);
        if (rc) return rc;
    }
    return 0;
}

static void NAME(backward_dx)(const T *restrict g, const T *restrict x, T *restrict dx, int64_t N, int64_t C,
                              int64_t L, int64_t c0, int64_t c1, const T *restrict mean, const T *restrict k,
                              const T *restrict A, const T *restrict B);

/* Training backward sums over channels [c0, c1): Σg and Σg·(x−μ), ∂ℓ/∂γ and ∂ℓ/∂β, and, when dx is
 * wanted, its coefficients; acc holds 2·C doubles, coef 3·C values of T (k, A, B). */
static void NAME(backward_sums)(const T *restrict g, const T *restrict x, int64_t N, int64_t C, int64_t L,
                                int64_t c0, int64_t c1, const T *w, const T *mean, const T *invstd, int unbiased,
                                T *grad_w, T *grad_b, double *acc, T *coef, int want_dx)
{
    const double m = (double)N * (double)L;
    double *sg = acc, *sgd = acc + C;
    T *k = coef, *A = coef + C, *B = coef + 2 * C;
    for (int64_t c = c0; c < c1; c++) { sg[c] = 0.0; sgd[c] = 0.0; }
    if (L == 1) {
        int64_t n = 0;
        for (; n + ROWS <= N; n += ROWS) {
            const T *g0 = g + n * C, *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
            const T *x0 = x + n * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
            _Pragma("omp simd")
            for (int64_t c = c0; c < c1; c++) {
                const double mu = (double)mean[c];
                const double a0 = (double)g0[c], a1 = (double)g1[c], a2 = (double)g2[c], a3 = (double)g3[c];
                sg[c] += (a0 + a1) + (a2 + a3);
                sgd[c] += (a0 * ((double)x0[c] - mu) + a1 * ((double)x1[c] - mu))
                        + (a2 * ((double)x2[c] - mu) + a3 * ((double)x3[c] - mu));
            }
        }
        for (; n < N; n++) {
            const T *gr = g + n * C, *xr = x + n * C;
            _Pragma("omp simd")
            for (int64_t c = c0; c < c1; c++) {
                const double gg = (double)gr[c];
                sg[c] += gg;
                sgd[c] += gg * ((double)xr[c] - (double)mean[c]);
            }
        }
    } else {
        for (int64_t n = 0; n < N; n++)
            for (int64_t c = c0; c < c1; c++) {
                const int64_t o = (n * C + c) * L;
                NAME(plane_grad_sums)(g + o, x + o, L, (double)mean[c], &sg[c], &sgd[c]);
            }
    }
    for (int64_t c = c0; c < c1; c++) {
        if (grad_w) grad_w[c] = (T)(sgd[c] * (double)invstd[c]);
        if (grad_b) grad_b[c] = (T)sg[c];
    }
    if (!want_dx) return;
    const double cu = unbiased ? m / (m - 1.0) : 1.0;
    for (int64_t c = c0; c < c1; c++) {
        const double is = (double)invstd[c];
        const double kc = is * (w ? (double)w[c] : 1.0);
        k[c] = (T)kc;
        A[c] = (T)(-kc * cu * is * is * sgd[c] / m);
        B[c] = (T)(-kc * sg[c] / m);
    }
}

/* Training backward over channels [c0, c1), block by block (channel_block): a block's sums, then its dx,
 * while its parts of g and x are still in cache from the first pass. */
static void NAME(train_backward_range)(const T *restrict g, const T *restrict x, T *restrict dx, int64_t N,
                                       int64_t C, int64_t L, int64_t c0, int64_t c1, const T *w, const T *mean,
                                       const T *invstd, int unbiased, T *grad_w, T *grad_b, double *acc, T *coef)
{
    const int64_t cb = dx && L > 1 ? NAME(channel_block)(N, C, L) : C;
    for (int64_t b0 = c0; b0 < c1; b0 += cb) {
        const int64_t b1 = b0 + cb < c1 ? b0 + cb : c1;
        NAME(backward_sums)(g, x, N, C, L, b0, b1, w, mean, invstd, unbiased, grad_w, grad_b, acc, coef, dx != NULL);
        if (dx) NAME(backward_dx)(g, x, dx, N, C, L, b0, b1, mean, coef, coef + C, coef + 2 * C);
    }
}

/* dx = g·k + (x − μ)·A + B over channels [c0, c1) of (N, C, L) data. */
static void NAME(backward_dx)(const T *restrict g, const T *restrict x, T *restrict dx, int64_t N, int64_t C,
                              int64_t L, int64_t c0, int64_t c1, const T *restrict mean, const T *restrict k,
                              const T *restrict A, const T *restrict B)
{
    if (L == 1) {
        int64_t n = 0;
        for (; n + ROWS <= N; n += ROWS) {
            const T *g0 = g + n * C, *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
            const T *x0 = x + n * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
            T *d0 = dx + n * C, *d1 = d0 + C, *d2 = d1 + C, *d3 = d2 + C;
            _Pragma("omp simd")
            for (int64_t c = c0; c < c1; c++) {
                const T kk = k[c], aa = A[c], bb = B[c], mu = mean[c];
                d0[c] = g0[c] * kk + (x0[c] - mu) * aa + bb;
                d1[c] = g1[c] * kk + (x1[c] - mu) * aa + bb;
                d2[c] = g2[c] * kk + (x2[c] - mu) * aa + bb;
                d3[c] = g3[c] * kk + (x3[c] - mu) * aa + bb;
            }
        }
        for (; n < N; n++) {
            const T *gr = g + n * C, *xr = x + n * C;
            T *dr = dx + n * C;
            _Pragma("omp simd")
            for (int64_t c = c0; c < c1; c++) dr[c] = gr[c] * k[c] + (xr[c] - mean[c]) * A[c] + B[c];
        }
    } else {
        for (int64_t n = 0; n < N; n++)
            for (int64_t c = c0; c < c1; c++) {
                const int64_t o = (n * C + c) * L;
                const T *gp = g + o, *xp = x + o;
                T *dp = dx + o;
                const T kk = k[c], aa = A[c], bb = B[c], mu = mean[c];
                _Pragma("omp simd")
                for (int64_t l = 0; l < L; l++) dp[l] = gp[l] * kk + (xp[l] - mu) * aa + bb;
            }
    }
}

/* Training backward. Σg and Σg·(x−μ) per channel, then
 * dx = k·(g − Σg/m − c·x̂·Σg·x̂/m), k = γ·invstd, c = m/(m−1) when normalizing by the unbiased variance,
 * formed as dx = g·k + (x−μ)·A + B with per-channel A = −k·c·invstd²·Σg(x−μ)/m and B = −k·Σg/m.
 * grad_w (Σg·x̂), grad_b (Σg) and dx may each be NULL when not needed. Returns 0, or -1 on no memory. */
int NAME(bn_train_backward)(const T *restrict g, const T *restrict x, T *restrict dx, int64_t N, int64_t C,
                            int64_t L, const T *w, const T *mean, const T *invstd, int unbiased, T *grad_w,
                            T *grad_b)
{
    double *acc = malloc(sizeof(double) * 2 * (size_t)C);
    T *coef = malloc(sizeof(T) * 3 * (size_t)C);
    if (!acc || !coef) { free(acc); free(coef); return -1; }
    if (L == 1 && dx) {
        /* (N, C) data: dx by rows, once every channel's coefficients are known (not in blocks: see
         * bn_train_forward). */
        BN_PARALLEL_CHANNELS_THEN_ROWS(N * C, C, N,
            NAME(backward_sums)(g, x, N, C, L, c0, c1, w, mean, invstd, unbiased, grad_w, grad_b, acc, coef, 1),
            NAME(backward_dx)(g + r0 * C, x + r0 * C, dx + r0 * C, r1 - r0, C, 1, 0, C, mean, coef, coef + C,
                              coef + 2 * C));
    } else {
        BN_PARALLEL_CHANNELS(N * C * L, C,
            NAME(train_backward_range)(g, x, dx, N, C, L, c0, c1, w, mean, invstd, unbiased, grad_w, grad_b, acc,
                                       coef));
    }
    free(acc);
    free(coef);
    return 0;
}

/* Inference forward with the running estimates: y = (x − running_mean)·γ/sqrt(running_var + ε) + β. */
int NAME(bn_eval_forward)(const T *restrict x, T *restrict y, int64_t N, int64_t C, int64_t L,
                          const T *run_mean, const T *run_var, const T *w, const T *b, double eps)
{
    T *coef = malloc(sizeof(T) * 2 * (size_t)C);
    if (!coef) return -1;
    T *k = coef, *beta = coef + C;
    for (int64_t c = 0; c < C; c++) {
        k[c] = (T)((w ? (double)w[c] : 1.0) / sqrt((double)run_var[c] + eps));
        beta[c] = b ? b[c] : (T)0;
    }
    if (L == 1)  /* (N, C) data: by rows */
        BN_PARALLEL_CHANNELS_THEN_ROWS(N * C, C, N, (void)c0; (void)c1,
                                       NAME(affine)(x + r0 * C, y + r0 * C, r1 - r0, C, 1, 0, C, run_mean, k, beta));
    else
        BN_PARALLEL_CHANNELS(N * C * L, C, NAME(affine)(x, y, N, C, L, c0, c1, run_mean, k, beta));
    free(coef);
    return 0;
}

#undef ROWS
#undef LANES
#undef BLOCK_BYTES
