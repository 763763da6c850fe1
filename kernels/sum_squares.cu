// Sum of squares of each of T tensors in one launch pair, float32: the per-tensor norms of
// LARS and LAMB (||w||, ||g||, ||r||) and LENA's per-layer squared gradient norms, without
// one reduction launch per tensor (a model's small biases and scales make those launches,
// not the bytes, the cost) and without a host round trip per tensor.
//
// Stage 1, sum_squares_partial: grid (P, T); block column y = tensor y, the P blocks of a
// column stride over its elements and each writes one partial sum, partial[y, x].
// Stage 2, sum_squares_finish: one block per tensor adds its P partials in a fixed order.
// Deterministic (no atomics); the order differs from a BLAS dot product's, so the values
// agree with hpdl's NumPy sums to float32 rounding.
// No #include: the source must compile under NVRTC (cupy.RawModule) as well as nvcc.

// Sum of v over the lanes of a warp, returned to every lane.
__device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of v over the whole block (a multiple of 32 threads, up to 1024), valid in thread 0.
__device__ float block_sum(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();  // every warp's partial written before warp 0 reads them
    return warp == 0 ? warp_sum(lane < (int)(blockDim.x / 32) ? scratch[lane] : 0.0f) : 0.0f;
}

// One row of the table of tensors: a float32 tensor's device address and element count.
struct Tensor {
    const float* a;
    unsigned long long n;
};

// tensors: (T,) rows  partial: (T, P) with P = gridDim.x
extern "C" __global__ void sum_squares_partial(const Tensor* tensors, float* partial) {
    const float* a = tensors[blockIdx.y].a;
    const size_t n = (size_t)tensors[blockIdx.y].n;
    float s = 0.0f;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)blockDim.x * gridDim.x) {
        s += a[k] * a[k];
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = s;
}

// partial: (T, P)  ->  out: (T,), out[y] = sum of partial[y, :].  Launch: grid (T,).
extern "C" __global__ void sum_squares_finish(const float* partial, float* out, int P) {
    float s = 0.0f;
    for (int x = threadIdx.x; x < P; x += blockDim.x) s += partial[(size_t)blockIdx.x * P + x];
    s = block_sum(s);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}
