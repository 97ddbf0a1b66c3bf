#!/usr/bin/env bash
# run_device.sh: the CUDA backend's whole check on a GPU machine, from the repository root:
# build (16 jobs), the tests through ctest, the benchmark, then compute-sanitizer memcheck (every
# test) and racecheck (the shared-memory merge: a subset of cases). Logs go to $OUT (default
# build/cuda-device). Dependencies the machine lacks (nlohmann-json, GoogleTest) are taken from
# build/deps/usr when present (copies of the Debian packages); if the build still fails, the
# prebuilt binaries in build/cuda-carry are used instead. On a Debian machine with the packages:
#   d=build/deps/usr; mkdir -p $d/include $d/share/cmake $d/lib/x86_64-linux-gnu/cmake
#   cp -r /usr/include/{nlohmann,gtest,gmock} $d/include
#   cp -r /usr/share/cmake/nlohmann_json $d/share/cmake
#   cp /usr/lib/x86_64-linux-gnu/lib{gtest,gmock}*.a $d/lib/x86_64-linux-gnu
#   cp -r /usr/lib/x86_64-linux-gnu/cmake/GTest $d/lib/x86_64-linux-gnu/cmake
# Knobs (environment): ARCH (CUDA architectures, default the CMake default "80;90"), BENCH_ARGS
# (default "8192,32768,131072 1,16"), and the time limits in seconds TEST_S, BENCH_S, MEMCHECK_S,
# RACECHECK_S (defaults 600, 240, 300, 200; 0 skips that sanitizer), MEMCHECK_FILTER and
# RACECHECK_FILTER (gtest filters), to fit a lease.
set -uo pipefail
out=${OUT:-build/cuda-device}
mkdir -p "$out"
build=build/cuda
step() { printf '\n=== %s\n' "$*"; }

{
  step "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv
  nvcc --version | tail -2
  cmake --version | head -1
  nproc

  step "configure and build (16 jobs)"
  t0=$(date +%s)
  prefix=()
  [ -d build/deps/usr ] && prefix=(-DCMAKE_PREFIX_PATH="$PWD/build/deps/usr")
  [ -n "${ARCH:-}" ] && prefix+=(-DVATTN_CUDA_ARCHITECTURES="$ARCH")
  if cmake -S . -B $build -G Ninja -DVATTN_CUDA=ON -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" \
       -DCMAKE_BUILD_TYPE=Release -DVATTN_TOOLS=OFF -DVATTN_BENCH=OFF "${prefix[@]}" \
       >"$out/configure.log" 2>&1 &&
     cmake --build $build -j16 --target test_cuda bench_cuda >"$out/build.log" 2>&1; then
    echo "built here in $(($(date +%s) - t0)) s"
    bin=$build
    step "ctest (full output in ctest.txt)"
    timeout "${TEST_S:-600}" ctest --test-dir $build -R cuda --output-on-failure -V \
      >"$out/ctest.txt" 2>&1
    echo "ctest rc=$?"
    grep -E '^[0-9]+: \[cuda|Test +#|tests passed|tests failed|FAILED|Failure' "$out/ctest.txt"
  else
    echo "build here failed after $(($(date +%s) - t0)) s; tails of the logs:"
    tail -15 "$out/configure.log" "$out/build.log"
    bin=build/cuda-carry
    step "tests (carried binary)"
    $bin/test_cuda
    echo "test_cuda rc=$?"
  fi

  step "benchmark"
  # shellcheck disable=SC2086
  timeout "${BENCH_S:-240}" $bin/bench_cuda ${BENCH_ARGS:-8192,32768,131072 1,16}
  echo "bench rc=$?"

  step "compute-sanitizer memcheck (all tests but the long end-to-end comparison)"
  if [ "${MEMCHECK_S:-300}" = 0 ]; then echo "memcheck skipped (MEMCHECK_S=0)"; else
  timeout "${MEMCHECK_S:-300}" compute-sanitizer --tool memcheck --error-exitcode 3 \
    $bin/test_cuda --gtest_brief=1 --gtest_filter="${MEMCHECK_FILTER:--cuda_run.same_index_sets_as_cpu}" \
    >"$out/memcheck.txt" 2>&1
  echo "memcheck rc=$?"
  tail -8 "$out/memcheck.txt"
  fi

  step "compute-sanitizer racecheck (subset)"
  if [ "${RACECHECK_S:-200}" = 0 ]; then echo "racecheck skipped (RACECHECK_S=0)"; else
  timeout "${RACECHECK_S:-200}" compute-sanitizer --tool racecheck --error-exitcode 3 $bin/test_cuda \
    --gtest_brief=1 \
    --gtest_filter="${RACECHECK_FILTER:-cuda_dense.strided*:cuda_dense.graph*:cuda_errors.*:cuda_sampler.repro*:cuda_run.graph*:cuda_run.bad*}" \
    >"$out/racecheck.txt" 2>&1
  echo "racecheck rc=$?"
  tail -8 "$out/racecheck.txt"
  fi

} 2>&1 | tee "$out/log.txt"
