// im2col and col2im for 2-D convolution, float32, as hpdl/layers/conv.py.
//
// x: (N, C, H, W) indexed, in any memory layout: im2col reads it through its element strides
// (sn, sc, sh, sw), so conv's batch-innermost activations need no copy; col2im writes it
// NCHW-contiguous, or (C, H, W, N)-contiguous with batch_inner as conv's layers hand on.
// cols in one of two layouts, rows (c, i, j) like a flattened (C, k, k)
// filter and columns over the samples n and the Ho x Wo output positions (a, b):
//   batched = 0: (C k k, Ho Wo N)    as conv.im2col / conv.col2im (one product for the batch,
//                                    landing batch-innermost)
//   batched = 1: (N, C k k, Ho Wo)   sample-major: a batched product W @ cols lands in NCHW
// cols[c, i, j, a, b, n] = x[n, c, a s + i - pad, b s + j - pad], 0 outside the image.
// Padding is read as zeros in place: no padded copy of x is made.
// No #include: the source must compile under NVRTC (cupy.RawModule) as well as nvcc.
// Launch: a 1-D grid of any size; the grid-stride loops cover the rest.

// The flat offset of row r = (c, i, j), sample n, position p = (a, b) in either layout.
__device__ size_t col_index(int batched, int n, int r, int p, int N, int R, int P) {
    return batched ? ((size_t)n * R + r) * P + p : ((size_t)r * P + p) * N + n;
}

// One thread per element of cols, walked in cols' memory order so the writes coalesce.
extern "C" __global__ void im2col(const float* x, float* cols, int N, int C, int H, int W,
                                  int k, int stride, int pad, int Ho, int Wo, int batched,
                                  long long sn, long long sc, long long sh, long long sw) {
    const int R = C * k * k, P = Ho * Wo;
    const size_t total = (size_t)N * R * P;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)blockDim.x * gridDim.x) {
        int n, r, p;
        if (batched) { p = (int)(t % P); r = (int)((t / P) % R); n = (int)(t / ((size_t)P * R)); }
        else { n = (int)(t % N); p = (int)((t / N) % P); r = (int)(t / ((size_t)N * P)); }
        const int c = r / (k * k), i = (r / k) % k, j = r % k;
        const int h = (p / Wo) * stride + i - pad, w = (p % Wo) * stride + j - pad;
        cols[t] = (0 <= h && h < H && 0 <= w && w < W)
                ? x[n * sn + c * sc + h * sh + w * sw] : 0.0f;
    }
}

// The adjoint: x[n, c, h, w] = sum of cols[c, i, j, a, b, n] over the (i, j, a, b) with
// a s + i - pad = h and b s + j - pad = w.
// A gather, one thread per element of x summing its own k x k candidates, rather than a
// scatter with atomicAdd from each element of cols: every output is written once, with no
// atomics and no zero-fill pass, and the sum runs in a fixed order, i then j ascending, the
// order in which conv.col2im's slab loop adds, so the result equals NumPy's bit for bit and
// is the same from run to run (float atomicAdd order is not).
// Threads walk x in its memory order, so the writes coalesce.
extern "C" __global__ void col2im(const float* cols, float* x, int N, int C, int H, int W,
                                  int k, int stride, int pad, int Ho, int Wo, int batched,
                                  int batch_inner) {
    const int R = C * k * k, P = Ho * Wo;
    const size_t total = (size_t)N * C * H * W;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (size_t)blockDim.x * gridDim.x) {
        int n, c, h, w;
        if (batch_inner) {
            n = (int)(t % N); w = (int)((t / N) % W); h = (int)((t / ((size_t)N * W)) % H);
            c = (int)(t / ((size_t)N * W * H));
        } else {
            w = (int)(t % W); h = (int)((t / W) % H); c = (int)((t / ((size_t)W * H)) % C);
            n = (int)(t / ((size_t)W * H * C));
        }
        float acc = 0.0f;
        for (int i = 0; i < k; ++i) {
            const int hs = h + pad - i;  // = a stride for the output row a this tap reads
            if (hs < 0) break;           // hs only falls as i grows
            if (hs % stride != 0 || hs / stride >= Ho) continue;
            for (int j = 0; j < k; ++j) {
                const int ws = w + pad - j;
                if (ws < 0) break;
                if (ws % stride != 0 || ws / stride >= Wo) continue;
                const int r = (c * k + i) * k + j, p = (hs / stride) * Wo + ws / stride;
                acc = __fadd_rn(acc, cols[col_index(batched, n, r, p, N, R, P)]);
            }
        }
        x[t] = acc;
    }
}
