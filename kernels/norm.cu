// LayerNorm and training-mode BatchNorm, forward and backward, float32, as
// hpdl/layers/norm.py: one block per row (LayerNorm) or per channel (BatchNorm) reduces
// that row's or channel's statistics in shared memory, then the same block writes the
// normalized values, so each reduction needs no second launch and no atomics.
//
// Statistics are two-pass, as in the NumPy code: the mean first, then the mean of the
// squared deviations (one-pass E[x^2] - E[x]^2 cancels catastrophically in float32). The
// sums run in a different order from NumPy's pairwise sums, so results agree with it to
// float32 rounding, not bit for bit.
// No #include: the source must compile under NVRTC (cupy.RawModule) as well as nvcc.
//
// Launch: grid (rows or channels, capped; the kernels stride over the rest), block a
// multiple of 32 up to 1024 threads.

// Sum of v over the lanes of a warp, returned to every lane.
__device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of v over the whole block, returned to every thread. scratch: 33 shared floats.
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();  // every warp's partial written before warp 0 reads them
    if (warp == 0) {
        v = warp_sum(lane < (int)(blockDim.x / 32) ? scratch[lane] : 0.0f);
        if (lane == 0) scratch[32] = v;
    }
    __syncthreads();  // the total written before anyone reads it
    const float total = scratch[32];
    __syncthreads();  // everyone has read it before a next call overwrites scratch
    return total;
}

// ---- LayerNorm over the last axis --------------------------------------------------------

// x, y, xhat: (R, n) row-major  gamma, beta: (n,)  rstd: (R,)
// mean = sum(x) / n;  xc = x - mean;  rstd = 1 / sqrt(sum(xc^2) / n + eps);
// xhat = xc rstd;  y = xhat gamma + beta
extern "C" __global__ void layernorm_forward(const float* x, const float* gamma,
                                             const float* beta, float* y, float* xhat,
                                             float* rstd, int R, int n, float eps) {
    __shared__ float scratch[33];
    for (int row = blockIdx.x; row < R; row += gridDim.x) {
        const float* xr = x + (size_t)row * n;
        float s = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) s += xr[j];
        const float mean = block_sum(s, scratch) / n;
        float q = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float d = xr[j] - mean;
            q += d * d;
        }
        const float r = 1.0f / sqrtf(block_sum(q, scratch) / n + eps);
        if (threadIdx.x == 0) rstd[row] = r;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            size_t k = (size_t)row * n + j;
            float h = (xr[j] - mean) * r;
            xhat[k] = h;
            y[k] = h * gamma[j] + beta[j];
        }
    }
}

// dy, xhat, dx: (R, n)  rstd: (R,)  gamma: (n,)
// dxhat = dy gamma;  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), means per row.
// dgamma and dbeta are column sums over rows: column_sums_partial / column_sums_finish.
extern "C" __global__ void layernorm_backward(const float* dy, const float* xhat,
                                              const float* rstd, const float* gamma,
                                              float* dx, int R, int n) {
    __shared__ float scratch[33];
    for (int row = blockIdx.x; row < R; row += gridDim.x) {
        const size_t base = (size_t)row * n;
        float a = 0.0f, b = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float d = dy[base + j] * gamma[j];
            a += d;
            b += d * xhat[base + j];
        }
        const float mean_d = block_sum(a, scratch) / n;
        const float mean_dx = block_sum(b, scratch) / n;
        const float r = rstd[row];
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float h = xhat[base + j];
            dx[base + j] = r * (dy[base + j] * gamma[j] - mean_d - h * mean_dx);
        }
    }
}

// The LayerNorm parameter gradients, stage 1 of 2. dy, xhat: (R, n).
// partial: (chunks, 2, n), chunk c holding, over its rows [c rows_per_chunk, ...):
//   partial[c, 0, j] = sum dy xhat (dgamma),  partial[c, 1, j] = sum dy (dbeta)
// Launch: grid (column tiles, chunks), 1-D blocks; adjacent threads take adjacent
// columns, so every row is read coalesced.
extern "C" __global__ void column_sums_partial(const float* dy, const float* xhat,
                                               float* partial, int R, int n,
                                               int rows_per_chunk) {
    const int c = blockIdx.y;
    const int row_end = (c + 1) * rows_per_chunk < R ? (c + 1) * rows_per_chunk : R;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += blockDim.x * gridDim.x) {
        float sg = 0.0f, sb = 0.0f;
        for (int row = c * rows_per_chunk; row < row_end; ++row) {
            size_t k = (size_t)row * n + j;
            sg += dy[k] * xhat[k];
            sb += dy[k];
        }
        partial[((size_t)c * 2) * n + j] = sg;
        partial[((size_t)c * 2 + 1) * n + j] = sb;
    }
}

// Stage 2: out[j] = sum over chunks of partial[c, j], j < m (m = 2n: dgamma then dbeta).
// A fixed summation order, so the result is deterministic (no atomics).
extern "C" __global__ void column_sums_finish(const float* partial, float* out, int chunks,
                                              int m) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < m; j += blockDim.x * gridDim.x) {
        float s = 0.0f;
        for (int c = 0; c < chunks; ++c) s += partial[(size_t)c * m + j];
        out[j] = s;
    }
}

// ---- BatchNorm, training mode: statistics over the M = N H W values of each channel ------
//
// Value k (0 <= k < M) of channel c lies at c_stride c + run_stride (k / run) + k % run, in runs
// of `run` contiguous floats: (N, C, S) row-major (NCHW, S = H W) is c_stride = run = S,
// run_stride = C S; channel-major storage, conv's batch-innermost (C, H, W, N) among them, is
// c_stride = run = M, one run per channel. Every array of one launch shares the layout.
struct ChannelLayout {
    size_t c_stride, run, run_stride;
    __device__ size_t at(int c, size_t k) const {
        if (run_stride == 0) return c * c_stride + k;   // one run per channel: no 64-bit division
        const size_t r = k / run;
        return c * c_stride + r * run_stride + (k - r * run);
    }
};

// x, y, xhat: the layout L = (c_stride, run, run_stride)  gamma, beta, rstd, running_mean, running_var: (C,)
// mean = sum(x) / M;  var = sum((x - mean)^2) / M;  rstd = 1 / sqrt(var + eps);
// xhat = (x - mean) rstd;  y = xhat gamma + beta;
// running_mean = running_mean keep + mom mean;  running_var = running_var keep + mom_unb var
// with keep = 1 - momentum, mom = momentum, mom_unb = momentum M / (M - 1).
extern "C" __global__ void batchnorm_forward(const float* x, const float* gamma,
                                             const float* beta, float* y, float* xhat,
                                             float* rstd, float* running_mean,
                                             float* running_var, int C, size_t M,
                                             size_t c_stride, size_t run, size_t run_stride,
                                             float eps, float keep, float mom, float mom_unb) {
    __shared__ float scratch[33];
    const ChannelLayout L{c_stride, run, run_stride};
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        float s = 0.0f;
        for (size_t k = threadIdx.x; k < M; k += blockDim.x) s += x[L.at(c, k)];
        const float mean = block_sum(s, scratch) / M;
        float q = 0.0f;
        for (size_t k = threadIdx.x; k < M; k += blockDim.x) {
            float d = x[L.at(c, k)] - mean;
            q += d * d;
        }
        const float var = block_sum(q, scratch) / M;
        const float r = 1.0f / sqrtf(var + eps);
        const float gc = gamma[c], bc = beta[c];
        for (size_t k = threadIdx.x; k < M; k += blockDim.x) {
            const size_t idx = L.at(c, k);
            float h = (x[idx] - mean) * r;
            xhat[idx] = h;
            y[idx] = h * gc + bc;
        }
        if (threadIdx.x == 0) {
            rstd[c] = r;
            running_mean[c] = running_mean[c] * keep + mom * mean;
            running_var[c] = running_var[c] * keep + mom_unb * var;
        }
    }
}

// dy, xhat, dx: the layout L  rstd, gamma, dgamma, dbeta: (C,)   (training mode)
// dbeta = sum dy;  dgamma = sum dy xhat;  with dxhat = dy gamma, over the M values:
// dx = rstd (dxhat - gamma dbeta / M - xhat gamma dgamma / M)
// = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)): one reading pass, one writing pass.
extern "C" __global__ void batchnorm_backward(const float* dy, const float* xhat,
                                              const float* rstd, const float* gamma, float* dx,
                                              float* dgamma, float* dbeta, int C, size_t M,
                                              size_t c_stride, size_t run, size_t run_stride) {
    __shared__ float scratch[33];
    const ChannelLayout L{c_stride, run, run_stride};
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        float a = 0.0f, b = 0.0f;
        for (size_t k = threadIdx.x; k < M; k += blockDim.x) {
            const size_t idx = L.at(c, k);
            a += dy[idx];
            b += dy[idx] * xhat[idx];
        }
        const float sum_dy = block_sum(a, scratch);
        const float sum_dyx = block_sum(b, scratch);
        const float gc = gamma[c], r = rstd[c];
        const float mean_d = gc * sum_dy / M, mean_dx = gc * sum_dyx / M;
        for (size_t k = threadIdx.x; k < M; k += blockDim.x) {
            const size_t idx = L.at(c, k);
            dx[idx] = r * (dy[idx] * gc - mean_d - xhat[idx] * mean_dx);
        }
        if (threadIdx.x == 0) {
            dgamma[c] = sum_dyx;
            dbeta[c] = sum_dy;
        }
    }
}
