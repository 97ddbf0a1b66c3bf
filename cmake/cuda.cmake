# cmake/cuda.cmake: the CUDA backend (src/cuda) as the static library vattn_cuda, its tests
# (test_cuda, skipped without a GPU) and its benchmark (bench_cuda). Included by the top-level
# CMakeLists.txt when VATTN_CUDA is on, after the vattn target exists.
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

set(VATTN_CUDA_ARCHITECTURES "80;90" CACHE STRING "GPU architectures of the CUDA backend")
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
if(VATTN_SANITIZE)
  message(WARNING "VATTN_SANITIZE: the CUDA sources are built without sanitizers; running "
                  "test_cuda under ASan needs ASAN_OPTIONS=protect_shadow_gap=0")
endif()

# The top-level compile options (-Wall, -march=native, -fsanitize=...) are host-compiler flags
# that nvcc rejects: CUDA targets take them for their C++ sources only, and warnings through
# -Xcompiler for their CUDA sources.
get_directory_property(_vattn_host_options COMPILE_OPTIONS)
function(vattn_cuda_options target)
  set_property(TARGET ${target} PROPERTY COMPILE_OPTIONS "")
  foreach(option IN LISTS _vattn_host_options)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${option}>)
  endforeach()
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter -lineinfo>)
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${VATTN_CUDA_ARCHITECTURES}")
endfunction()

add_library(vattn_cuda STATIC
  src/cuda/decode.cu
  src/cuda/split_bf16.cu
  src/cuda/split_f16.cu
  src/cuda/split_f32.cu
  src/cuda/vattn_run.cu
)
# run()'s selection and budget kernels reproduce the CPU's float and double rounding step by step:
# no multiply-add contraction beyond the fused operations they spell out.
set_source_files_properties(src/cuda/vattn_run.cu PROPERTIES COMPILE_OPTIONS "-fmad=false")
add_library(vattn::cuda ALIAS vattn_cuda)
vattn_cuda_options(vattn_cuda)
target_include_directories(vattn_cuda PUBLIC include src)
target_link_libraries(vattn_cuda PUBLIC vattn CUDA::cudart_static)
set_target_properties(vattn_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)

if(VATTN_TESTS)
  find_package(GTest REQUIRED)
  include(GoogleTest)
  enable_testing()
  add_executable(test_cuda tests/cuda/test_cuda.cpp)
  vattn_cuda_options(test_cuda)
  target_link_libraries(test_cuda PRIVATE vattn_cuda GTest::gtest_main)
  target_include_directories(test_cuda PRIVATE src tests)
  # Listing the tests needs no GPU; without one every GPU test reports SKIPPED with the reason.
  gtest_discover_tests(test_cuda TEST_PREFIX "cuda." DISCOVERY_TIMEOUT 60
                       PROPERTIES TIMEOUT 1800 LABELS cuda)
endif()

add_executable(bench_cuda tests/cuda/bench_cuda.cpp)
vattn_cuda_options(bench_cuda)
target_link_libraries(bench_cuda PRIVATE vattn_cuda)
target_include_directories(bench_cuda PRIVATE src)
