// Fused optimizer updates, float32: SGD (momentum, Nesterov, weight decay) and AdamW over
// all of a model's tensors in one launch, the DC-ASGD server update with its backup weights,
// and the EASGD elastic steps. Each replaces a chain of 5-12 element-wise CuPy operations
// (each a launch and a full read/write of the tensor) by one launch that reads and writes
// every array once.
//
// Every operation is an explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, ...) in
// the order hpdl's NumPy code performs it: the intrinsics are never contracted into FMAs,
// so each result is the same IEEE float32 value NumPy computes, bit for bit. The scalar
// coefficients arrive as float32 values rounded on the host from the same Python doubles
// the NumPy code uses.
// No #include: the source must compile under NVRTC (cupy.RawModule) as well as nvcc.
//
// All arrays: n elements, any shape, C-contiguous. Launch: a 1-D grid of any size; the
// grid-stride loops cover the rest.
//
// SGD and AdamW take a table with one row per tensor, so that a model's tens of small
// biases and scales cost one launch rather than one each (a launch costs the host more
// than such a tensor costs the GPU). Tensor t owns the virtual blocks
// [first_block, first_block + ceil(n / blockDim.x)) of the `blocks` in all, one thread per
// element; a block finds its row by binary search, and the grid strides over the blocks.
//
// halt: one float on the device; non-zero leaves every array untouched. The optimizer's
// gradient check writes it on the device, so a refused update costs the host no read-back
// (hpdl/optim/base.py, check_on_device).

// The row of virtual block b: the last of the T rows whose first_block <= b (a tensor with
// no elements shares its first_block with the next row, and so is never chosen).
template <class Row>
__device__ int row_of(const Row* rows, int T, unsigned long long b) {
    int lo = 0, hi = T - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (rows[mid].first_block <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// One row of sgd_update's table: 56 bytes, hpdl/kernels.py SGD_ROW.
struct SgdRow {
    float* w;
    const float* g;
    float* buf;                      // the momentum buffer (any pointer when mu == 0)
    unsigned long long n, first_block;
    float lr, wd;
    int first, unused;               // first: buf is overwritten (its first step)
};

// SGD as hpdl/optim/sgd.py (torch.optim.SGD without dampening), each row in place:
//   d = w wd + g  (wd != 0);  buf = d (first step) or buf mu + d;
//   d = buf mu + d (Nesterov) or buf;  w = w - lr d
// mu == 0: no momentum, buf is never touched.
extern "C" __global__ void sgd_update(const SgdRow* rows, int T, unsigned long long blocks, float mu,
                                      int nesterov, const float* halt) {
    if (*halt != 0.0f) return;
    for (unsigned long long b = blockIdx.x; b < blocks; b += gridDim.x) {
        const SgdRow r = rows[row_of(rows, T, b)];
        const size_t k = (size_t)(b - r.first_block) * blockDim.x + threadIdx.x;
        if (k >= r.n) continue;
        float wk = r.w[k];
        float d = r.g[k];
        if (r.wd != 0.0f) d = __fadd_rn(__fmul_rn(wk, r.wd), d);
        if (mu != 0.0f) {
            float buf = r.first ? d : __fadd_rn(__fmul_rn(r.buf[k], mu), d);
            r.buf[k] = buf;
            d = nesterov ? __fadd_rn(__fmul_rn(buf, mu), d) : buf;
        }
        r.w[k] = __fsub_rn(wk, __fmul_rn(r.lr, d));
    }
}

// One row of adamw_update's table: 64 bytes, hpdl/kernels.py ADAMW_ROW.
struct AdamwRow {
    float* w;
    const float* g;
    float* m;
    float* v;
    unsigned long long n, first_block;
    float decay, step_size;          // 1 - lr wd;  lr / (1 - b1^t)
    int apply_decay, unused;         // apply_decay: wd != 0
};

// AdamW as hpdl/optim/adamw.py (torch.optim.AdamW, no amsgrad) at step t, each row in place:
//   w = w decay (apply_decay);  m = m b1 + g c1;  v = v b2 + g^2 c2;
//   w = w - m / (sqrt(v) / bc2 + eps) * step_size
// with c1 = 1 - b1, c2 = 1 - b2, bc2 = sqrt(1 - b2^t).
extern "C" __global__ void adamw_update(const AdamwRow* rows, int T, unsigned long long blocks, float b1,
                                        float c1, float b2, float c2, float bc2, float eps,
                                        const float* halt) {
    if (*halt != 0.0f) return;
    for (unsigned long long b = blockIdx.x; b < blocks; b += gridDim.x) {
        const AdamwRow r = rows[row_of(rows, T, b)];
        const size_t k = (size_t)(b - r.first_block) * blockDim.x + threadIdx.x;
        if (k >= r.n) continue;
        float wk = r.w[k], gk = r.g[k];
        if (r.apply_decay) wk = __fmul_rn(wk, r.decay);
        float mk = __fadd_rn(__fmul_rn(r.m[k], b1), __fmul_rn(gk, c1));
        float vk = __fadd_rn(__fmul_rn(r.v[k], b2), __fmul_rn(__fmul_rn(gk, gk), c2));
        float s = __fadd_rn(__fdiv_rn(__fsqrt_rn(vk), bc2), eps);
        s = __fmul_rn(__fdiv_rn(mk, s), r.step_size);
        r.m[k] = mk;
        r.v[k] = vk;
        r.w[k] = __fsub_rn(wk, s);
    }
}

// The DC-ASGD server update as hpdl/algorithms/dcasgd.py, for a gradient g from worker m
// with backup row bak = w_bak(m), in place:
//   t = (w - bak) g g;  adaptive: ms = ms decay + g^2 c;  t = t / sqrt(ms + eps);
//   w = w - (t lambda + g) lr;  bak = w  (the reply sent back to m)
// with c = 1 - decay. Not adaptive (DC-ASGD-c): ms is never touched (any pointer will do).
extern "C" __global__ void dcasgd_update(float* w, float* bak, const float* g, float* ms,
                                         size_t n, float lr, float lambda_dc, int adaptive,
                                         float decay, float c, float eps) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)blockDim.x * gridDim.x) {
        float gk = g[k], wk = w[k];
        float t = __fmul_rn(__fmul_rn(__fsub_rn(wk, bak[k]), gk), gk);
        if (adaptive) {
            float mk = __fadd_rn(__fmul_rn(ms[k], decay), __fmul_rn(__fmul_rn(gk, gk), c));
            ms[k] = mk;
            t = __fdiv_rn(t, __fsqrt_rn(__fadd_rn(mk, eps)));
        }
        t = __fmul_rn(__fadd_rn(__fmul_rn(t, lambda_dc), gk), lr);
        wk = __fsub_rn(wk, t);
        w[k] = wk;
        bak[k] = wk;
    }
}

// Asynchronous EASGD's centre as hpdl/algorithms/easgd.py EasgdServer, for the x sent by a
// worker, in place:  e = (x - center) alpha;  center = center + e  (e is the reply).
extern "C" __global__ void easgd_elastic(float* center, const float* x, float* e, size_t n,
                                         float alpha) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)blockDim.x * gridDim.x) {
        float c = center[k];
        float ek = __fmul_rn(__fsub_rn(x[k], c), alpha);
        e[k] = ek;
        center[k] = __fadd_rn(c, ek);
    }
}

// Synchronous EASGD, one replica's half (easgd_sync_worker), in place:
//   x = x - ((x - center) rho + g) lr
extern "C" __global__ void easgd_sync_worker(float* x, const float* center, const float* g,
                                             size_t n, float lr, float rho) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)blockDim.x * gridDim.x) {
        float xk = x[k];
        float d = __fmul_rn(__fadd_rn(__fmul_rn(__fsub_rn(xk, center[k]), rho), g[k]), lr);
        x[k] = __fsub_rn(xk, d);
    }
}

// Synchronous EASGD, the centre's half (easgd_sync_center), in place:
//   center = center + (center neg_workers + x_sum) lr_rho,  neg_workers = -N, lr_rho = lr rho
extern "C" __global__ void easgd_sync_center(float* center, const float* x_sum, size_t n,
                                             float neg_workers, float lr_rho) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)blockDim.x * gridDim.x) {
        float c = center[k];
        float d = __fmul_rn(__fadd_rn(__fmul_rn(c, neg_workers), x_sum[k]), lr_rho);
        center[k] = __fadd_rn(c, d);
    }
}
