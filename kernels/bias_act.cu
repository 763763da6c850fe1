// Fused bias + activation (ReLU, GELU tanh approximation): forward and backward, float32.
//
// A Linear layer's bias add and the activation after it are both element-wise, so fusing
// them reads and writes the (B, N) activation once instead of twice. The bias gradient
// db = sum over rows of dx is left to cupy's axis-0 reduction, already one coalesced pass.
// No #include: the source must compile under NVRTC (cupy.RawModule) as well as nvcc.

// GELU(u) = 0.5 u (1 + tanh(k (u + c u^3))), k = sqrt(2/pi)
#define GELU_K 0.7978845608028654f
#define GELU_C 0.044715f

// Forward kernels walk a 2-D grid: x-threads over columns, y-blocks over rows. Each
// thread loads its bias b[j] once and needs no per-element `idx % N`, which costs more
// than the memory access in a kernel this light.

// y[i, j] = u (u > 0), u = x[i, j] + b[j]: max(u, 0) as hpdl's ReLU computes it, a multiply by
// the mask, so a NaN or -Inf u gives NaN (a non-finite value stays non-finite) and -0 stays -0.
// x, y: (B, N) row-major  b: (N,)
// y may alias x (in place): each element is read and written by the same thread.
extern "C" __global__ void bias_relu_forward(const float* x, const float* b, float* y,
                                             int B, int N) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < N; j += blockDim.x * gridDim.x) {
        float bj = b[j];
        for (int i = blockIdx.y; i < B; i += gridDim.y) {
            size_t k = (size_t)i * N + j;
            float u = x[k] + bj;
            y[k] = u * (u > 0.0f ? 1.0f : 0.0f);
        }
    }
}

// y = x (x > 0), hpdl's ReLU without a bias, in the layout x is stored in (a CuPy ufunc would
// write it C-ordered, turning conv's batch-innermost activations around).
// x, y: n elements, any shape; y may alias x.
extern "C" __global__ void relu_forward(const float* x, float* y, size_t n) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)blockDim.x * gridDim.x) {
        y[k] = x[k] * (x[k] > 0.0f ? 1.0f : 0.0f);
    }
}

// dx = dy * (y > 0): y > 0 exactly where x + b > 0, so the forward output is the mask.
// A multiply rather than a select, so a NaN or Inf in dy stays NaN where the mask is 0, as
// in the NumPy code: the gradient check sees it on both paths.
// y, dy, dx: n elements, any shape; dx may alias dy.
extern "C" __global__ void bias_relu_backward(const float* y, const float* dy, float* dx,
                                              size_t n) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)blockDim.x * gridDim.x) {
        dx[k] = dy[k] * (y[k] > 0.0f ? 1.0f : 0.0f);
    }
}

// u = x + b, y = GELU(u). GELU is not invertible, so u is kept for the backward pass.
// x, u, y: (B, N) row-major  b: (N,);  u or y may alias x (same thread, same element).
extern "C" __global__ void bias_gelu_forward(const float* x, const float* b, float* u,
                                             float* y, int B, int N) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < N; j += blockDim.x * gridDim.x) {
        float bj = b[j];
        for (int i = blockIdx.y; i < B; i += gridDim.y) {
            size_t k = (size_t)i * N + j;
            float v = x[k] + bj;
            float t = tanhf(GELU_K * (v + GELU_C * v * v * v));
            u[k] = v;
            y[k] = 0.5f * v * (1.0f + t);
        }
    }
}

// dx = dy * GELU'(u),
// GELU'(u) = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 c u^2),  t = tanh(k (u + c u^3)).
// u, dy, dx: n elements, any shape; dx may alias dy.
extern "C" __global__ void bias_gelu_backward(const float* u, const float* dy, float* dx,
                                              size_t n) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)blockDim.x * gridDim.x) {
        float v = u[k];
        float t = tanhf(GELU_K * (v + GELU_C * v * v * v));
        float dgelu = 0.5f * (1.0f + t)
                    + 0.5f * v * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_C * v * v);
        dx[k] = dy[k] * dgelu;
    }
}
