// Max pooling over disjoint k x k windows (stride k), float32, on batch-innermost memory:
// x (C, H, W, N), y and win (C, Ho, Wo, N), Ho = H / k, Wo = W / k, as hpdl/layers/pool.py
// stores them. One launch each way, where the array path takes 5 k^2 operations forward.
//
// Semantics of hpdl.layers.MaxPool2d's array path, bit for bit: y is numpy.maximum over the
// window's offsets in order (NaN if any is NaN); win is the first offset o = i k + j whose
// value equals y (255 when none does: a window holding a NaN), so ties send the whole
// gradient to one input; dx = dy * (win == o) with a multiply (a NaN dy stays NaN), and 0 in
// the rows and columns past the last window.
// No #include: the source must compile under NVRTC (cupy.RawModule) as well as nvcc.

// Element e of a (C, H, W, N) array, e = ((c H + h) W + w) N + n, as its four indices.
struct Index {
    int c, h, w, n;
};

__device__ Index split(size_t e, int H, int W, int N) {
    Index i;
    i.n = (int)(e % N);
    e /= N;
    i.w = (int)(e % W);
    e /= W;
    i.h = (int)(e % H);
    i.c = (int)(e / H);
    return i;
}

// Launch: a 1-D grid over y's C Ho Wo N elements (grid-stride).
extern "C" __global__ void maxpool_forward(const float* x, float* y, unsigned char* win, int C, int H,
                                           int W, int N, int k, int Ho, int Wo) {
    const size_t total = (size_t)C * Ho * Wo * N;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (size_t)blockDim.x * gridDim.x) {
        const Index i = split(e, Ho, Wo, N);   // i.h, i.w: the window's row and column
        const float* window = x + (((size_t)i.c * H + (size_t)i.h * k) * W + (size_t)i.w * k) * N + i.n;
        float m = window[0];
        for (int o = 1; o < k * k; ++o) {
            const float v = window[((size_t)(o / k) * W + o % k) * N];
            m = (m != m) ? m : (v != v) ? v : (v > m ? v : m);   // numpy.maximum(m, v)
        }
        unsigned char first = 255;
        for (int o = k * k - 1; o >= 0; --o) {
            if (window[((size_t)(o / k) * W + o % k) * N] == m) first = (unsigned char)o;
        }
        y[e] = m;
        win[e] = first;
    }
}

// Launch: a 1-D grid over dx's C H W N elements (grid-stride). dy, win: (C, Ho, Wo, N).
extern "C" __global__ void maxpool_backward(const float* dy, const unsigned char* win, float* dx, int C,
                                            int H, int W, int N, int k, int Ho, int Wo) {
    const size_t total = (size_t)C * H * W * N;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (size_t)blockDim.x * gridDim.x) {
        const Index i = split(e, H, W, N);
        const int a = i.h / k, b = i.w / k;   // the window of x[i]
        if (a >= Ho || b >= Wo) {
            dx[e] = 0.0f;
            continue;
        }
        const size_t out = (((size_t)i.c * Ho + a) * Wo + b) * N + i.n;
        dx[e] = dy[out] * (win[out] == (i.h % k) * k + i.w % k ? 1.0f : 0.0f);
    }
}
