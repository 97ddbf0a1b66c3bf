// split_bf16.cu: the split kernel's instances for bf16 K/V (see kernels.cuh).
#include "cuda/kernels.cuh"

namespace vattn::cuda::detail {
VATTN_CUDA_SPLIT_INSTANCES(dtype::bf16)
}  // namespace vattn::cuda::detail
