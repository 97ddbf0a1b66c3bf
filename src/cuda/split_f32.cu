// split_f32.cu: the split kernel's instances for f32 K/V (see kernels.cuh).
#include "cuda/kernels.cuh"

namespace vattn::cuda::detail {
VATTN_CUDA_SPLIT_INSTANCES(dtype::f32)
}  // namespace vattn::cuda::detail
