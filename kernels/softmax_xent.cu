// Fused softmax cross-entropy, forward and backward in one launch, float32: one block per row.
//
// Per row: an online pass keeps each thread's running (max, sum of exp(x - max)); a block
// reduction (warp shuffles, then one partial per warp) merges them into the row's max m and
// sum s; the loss is (m - x[label]) + log(s) and a second pass writes
// dlogits = (exp(x - m) / s - onehot) * scale. The row is read twice (the second read mostly
// hits cache) and never stored as probabilities.
// No #include: the source must compile under NVRTC (cupy.RawModule) as well as nvcc.

#define NEG_INF __uint_as_float(0xff800000u)  // -inf, without <math.h>'s INFINITY
#define NAN_F __uint_as_float(0x7fc00000u)     // quiet NaN

// Merge the partial log-sum-exp (m2, s2) into (m, s), where s = sum exp(x - m) over a set
// of logits. Rescaling both sides to the larger max keeps every exp() <= 1. Two empty sets
// (m = -inf) must stay empty: exp(-inf - -inf) would be NaN.
__device__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == NEG_INF) return;
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// Merge (m, s) across the 32 lanes of a warp; afterwards every lane holds the warp's result.
__device__ void warp_lse(float& m, float& s) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        lse_merge(m, s, m2, s2);
    }
}

// logits: (B, C) row-major  labels: (B,) in [0, C)  ->  loss: (B,)  dlogits: (B, C)
// loss[i] = logsumexp(logits[i]) - logits[i, labels[i]]
// dlogits[i, j] = (softmax(logits[i])[j] - [j == labels[i]]) * scale,  scale = dloss / B
// Launch: grid (B,), block a multiple of 32 up to 1024. A label outside [0, C) gives a NaN
// loss and NaN gradient for that row instead of an out-of-bounds read.
extern "C" __global__ void softmax_xent(const float* logits, const int* labels, float* loss,
                                        float* dlogits, int C, float scale) {
    __shared__ float warp_m[32], warp_s[32];  // one partial per warp, at most 1024/32 warps
    __shared__ float row_m, row_s;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int n_warps = blockDim.x / 32;
    const size_t row = blockIdx.x;
    const float* x = logits + row * C;
    float* dx = dlogits + row * C;
    const int y = labels[row];
    const bool valid = 0 <= y && y < C;

    // 1. Each thread: running max and sum of exp over its strided share of the row.
    float m = NEG_INF, s = 0.0f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        lse_merge(m, s, x[j], 1.0f);
    }

    // 2. Block reduction: lanes -> one partial per warp -> warp 0 -> shared (row_m, row_s).
    warp_lse(m, s);
    if (lane == 0) {
        warp_m[warp] = m;
        warp_s[warp] = s;
    }
    __syncthreads();  // all warp partials written before warp 0 reads them
    if (warp == 0) {
        m = lane < n_warps ? warp_m[lane] : NEG_INF;
        s = lane < n_warps ? warp_s[lane] : 0.0f;
        warp_lse(m, s);
        if (lane == 0) {
            row_m = m;
            row_s = s;
            // (m - x[y]) before adding log(s): with logits near 1e4, m + log(s) would round
            // to float32's 1e-3 spacing there and lose the loss's small digits.
            loss[row] = valid ? (m - x[y]) + logf(s) : NAN_F;
        }
    }
    __syncthreads();  // row_m, row_s written before any thread reads them

    // 3. Gradient: one more strided pass; x - max is exact for the entries that matter.
    const float mx = row_m, inv_s = 1.0f / row_s;
    const float bad = valid ? 0.0f : NAN_F;  // poison the whole row on a bad label
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        float p = expf(x[j] - mx) * inv_s;
        dx[j] = (p - (j == y ? 1.0f : 0.0f) + bad) * scale;
    }
}
