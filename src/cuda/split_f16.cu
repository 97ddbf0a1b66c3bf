// split_f16.cu: the split kernel's instances for f16 K/V (see kernels.cuh).
#include "cuda/kernels.cuh"

namespace vattn::cuda::detail {
VATTN_CUDA_SPLIT_INSTANCES(dtype::f16)
}  // namespace vattn::cuda::detail
