// Whether any element of T float32 tensors is NaN or Inf, in one launch over a pointer
// table: the optimizers' check of every gradient before an update (hpdl/nonfinite.py,
// hpdl/optim/base.py), which would otherwise take a reduction launch or two per tensor.
//
// Grid (x: blocks striding over a tensor's elements, y: tensors, striding past gridDim.y).
// flag: one float on the device, set to 1 where a non-finite element is found and left as
// it was otherwise; every writer stores the same value, so their race is harmless.
// v - v is 0 for every finite v and NaN for NaN and +-Inf; the _rn intrinsic keeps any
// compiler from folding it to 0.
// No #include: the source must compile under NVRTC (cupy.RawModule) as well as nvcc.

// One row of the table of tensors: a float32 tensor's device address and element count.
struct Tensor {
    const float* a;
    unsigned long long n;
};

// tensors: (T,) rows
extern "C" __global__ void any_nonfinite(const Tensor* tensors, int T, float* flag) {
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        const float* a = tensors[t].a;
        const size_t n = (size_t)tensors[t].n;
        for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
             k += (size_t)blockDim.x * gridDim.x) {
            if (__fsub_rn(a[k], a[k]) != 0.0f) *flag = 1.0f;
        }
    }
}

// The optimizer's bookkeeping after any_nonfinite set `refused` for update number `step`, on
// the device (hpdl/optim/base.py, check_on_device): the first refusal's step goes to
// refused_at, and halt is raised for this and every later update. Launch: one thread.
extern "C" __global__ void record_refusal(const float* refused, float* halt, long long* refused_at,
                                          long long step) {
    if (*refused == 0.0f) return;
    if (*halt == 0.0f) *refused_at = step;
    *halt = 1.0f;
}
