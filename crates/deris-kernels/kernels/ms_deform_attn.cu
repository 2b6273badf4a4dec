// Multi-scale deformable attention for deris: forward and the two backward kernels (f32).
//
// Layouts (all contiguous, row-major):
//   value     [B, S, M, Dh]          S = sum_l H_l*W_l, levels concatenated, each row-major
//   loc       [B, Lq, M, L, P, 2]    normalised (x, y)
//   attn      [B, Lq, M, L, P]
//   out, grad [B, Lq, M*Dh]
//   levels    int[L*3]               (H_l, W_l, start_l)
//
// Sampling rule (MODEL-SPEC 5.4, identical to the CPU kernels in src/ms_deform_attn/cpu.rs):
// xi = x*W - 0.5, yi = y*H - 0.5; a point with xi <= -1, yi <= -1, xi >= W or yi >= H samples 0
// and gets no gradient; otherwise the four neighbours of (floor(yi), floor(xi)) are blended
// bilinearly and a neighbour outside the map counts as 0. The coordinate arithmetic uses
// explicitly rounded operations so that no fused multiply-add changes which cell a point
// falls in compared with the CPU.

struct Point {
    int y0, x0;
    float ly, lx;
};

__device__ __forceinline__ bool locate(float x, float y, int h, int w, Point &pt) {
    const float xi = __fsub_rn(__fmul_rn(x, (float)w), 0.5f);
    const float yi = __fsub_rn(__fmul_rn(y, (float)h), 0.5f);
    if (!(xi > -1.f && yi > -1.f && xi < (float)w && yi < (float)h)) {
        return false;
    }
    const float x0 = floorf(xi);
    const float y0 = floorf(yi);
    pt.x0 = (int)x0;
    pt.y0 = (int)y0;
    pt.lx = __fsub_rn(xi, x0);
    pt.ly = __fsub_rn(yi, y0);
    return true;
}

// Neighbour k (0: top-left, 1: top-right, 2: bottom-left, 3: bottom-right). Returns false when
// it lies outside the map; otherwise its row in S, its weight and the weight's derivatives with
// respect to lx and ly.
__device__ __forceinline__ bool corner(const Point &pt, int k, int h, int w, int start, int &row,
                                       float &wgt, float &d_lx, float &d_ly) {
    const int dy = k >> 1;
    const int dx = k & 1;
    const int yy = pt.y0 + dy;
    const int xx = pt.x0 + dx;
    if (yy < 0 || xx < 0 || yy >= h || xx >= w) {
        return false;
    }
    const float wy = dy ? pt.ly : 1.f - pt.ly;
    const float wx = dx ? pt.lx : 1.f - pt.lx;
    wgt = wy * wx;
    d_lx = dx ? wy : -wy;
    d_ly = dy ? wx : -wx;
    row = start + yy * w + xx;
    return true;
}

// One thread per output element (b, q, m, c); threads of a warp read neighbouring channels.
extern "C" __global__ void ms_deform_attn_fwd_f32(const float *__restrict__ value,
                                                  const float *__restrict__ loc,
                                                  const float *__restrict__ attn,
                                                  const int *__restrict__ levels,
                                                  float *__restrict__ out, int B, int S, int M,
                                                  int Dh, int Lq, int L, int P) {
    const long long total = (long long)B * Lq * M * Dh;
    const long long row_len = (long long)M * Dh;
    for (long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x; n < total;
         n += (long long)blockDim.x * gridDim.x) {
        const int c = (int)(n % Dh);
        const long long t = n / Dh;
        const int m = (int)(t % M);
        const long long bq = t / M;
        const long long b = bq / Lq;
        const float *vb = value + b * S * row_len + (long long)m * Dh + c;
        const long long first = (bq * M + m) * L * P;
        float acc = 0.f;
        for (int l = 0; l < L; ++l) {
            const int h = levels[3 * l], w = levels[3 * l + 1], start = levels[3 * l + 2];
            for (int p = 0; p < P; ++p) {
                const long long i = first + (long long)l * P + p;
                Point pt;
                if (!locate(loc[2 * i], loc[2 * i + 1], h, w, pt)) {
                    continue;
                }
                const float a = attn[i];
                for (int k = 0; k < 4; ++k) {
                    int row;
                    float wgt, d_lx, d_ly;
                    if (corner(pt, k, h, w, start, row, wgt, d_lx, d_ly)) {
                        acc += (a * wgt) * vb[(long long)row * row_len];
                    }
                }
            }
        }
        out[n] = acc;
    }
}

// Gradient for value: one thread per (b, q, m, c) of grad, scattered with atomics.
// grad_value must be zero-filled.
extern "C" __global__ void ms_deform_attn_grad_value_f32(const float *__restrict__ loc,
                                                         const float *__restrict__ attn,
                                                         const float *__restrict__ grad,
                                                         const int *__restrict__ levels,
                                                         float *__restrict__ grad_value, int B,
                                                         int S, int M, int Dh, int Lq, int L,
                                                         int P) {
    const long long total = (long long)B * Lq * M * Dh;
    const long long row_len = (long long)M * Dh;
    for (long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x; n < total;
         n += (long long)blockDim.x * gridDim.x) {
        const int c = (int)(n % Dh);
        const long long t = n / Dh;
        const int m = (int)(t % M);
        const long long bq = t / M;
        const long long b = bq / Lq;
        float *gb = grad_value + b * S * row_len + (long long)m * Dh + c;
        const float g = grad[n];
        const long long first = (bq * M + m) * L * P;
        for (int l = 0; l < L; ++l) {
            const int h = levels[3 * l], w = levels[3 * l + 1], start = levels[3 * l + 2];
            for (int p = 0; p < P; ++p) {
                const long long i = first + (long long)l * P + p;
                Point pt;
                if (!locate(loc[2 * i], loc[2 * i + 1], h, w, pt)) {
                    continue;
                }
                const float a = attn[i];
                for (int k = 0; k < 4; ++k) {
                    int row;
                    float wgt, d_lx, d_ly;
                    if (corner(pt, k, h, w, start, row, wgt, d_lx, d_ly)) {
                        atomicAdd(gb + (long long)row * row_len, (a * wgt) * g);
                    }
                }
            }
        }
    }
}

// The sampler's vector-Jacobian product: one warp per sampling point (b, q, m, l, p), lanes over
// channels, then a warp reduction. out[3*i .. 3*i+3] = (d(g.s)/dx, d(g.s)/dy, g.s).
// blockDim.x must be a multiple of 32 so that every warp handles a single point.
extern "C" __global__ void ms_deform_attn_grad_sampling_f32(const float *__restrict__ value,
                                                            const float *__restrict__ loc,
                                                            const float *__restrict__ grad,
                                                            const int *__restrict__ levels,
                                                            float *__restrict__ out, int B,
                                                            int S, int M, int Dh, int Lq, int L,
                                                            int P) {
    const long long points = (long long)B * Lq * M * L * P;
    const long long row_len = (long long)M * Dh;
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; i < points;
         i += warps) {
        const int l = (int)((i / P) % L);
        const long long t = i / ((long long)P * L);
        const int m = (int)(t % M);
        const long long bq = t / M;
        const long long b = bq / Lq;
        const int h = levels[3 * l], w = levels[3 * l + 1], start = levels[3 * l + 2];
        const float *vb = value + b * S * row_len + (long long)m * Dh;
        const float *gq = grad + bq * row_len + (long long)m * Dh;
        float gs = 0.f, gx = 0.f, gy = 0.f;
        Point pt;
        if (locate(loc[2 * i], loc[2 * i + 1], h, w, pt)) {
            for (int k = 0; k < 4; ++k) {
                int row;
                float wgt, d_lx, d_ly;
                if (corner(pt, k, h, w, start, row, wgt, d_lx, d_ly)) {
                    const float *v = vb + (long long)row * row_len;
                    float gv = 0.f;
                    for (int c = lane; c < Dh; c += 32) {
                        gv += gq[c] * v[c];
                    }
                    gs += wgt * gv;
                    gx += d_lx * gv;
                    gy += d_ly * gv;
                }
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            gs += __shfl_down_sync(0xffffffffu, gs, off);
            gx += __shfl_down_sync(0xffffffffu, gx, off);
            gy += __shfl_down_sync(0xffffffffu, gy, off);
        }
        if (lane == 0) {
            out[3 * i] = gx * (float)w;
            out[3 * i + 1] = gy * (float)h;
            out[3 * i + 2] = gs;
        }
    }
}
