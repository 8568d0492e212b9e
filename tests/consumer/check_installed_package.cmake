# Installs mmbalance into a scratch prefix, then configures, builds and runs the consumer
# project against that prefix alone. Run with cmake -P (see tests/CMakeLists.txt).
file(REMOVE_RECURSE "${WORK_DIR}")
set(build "${WORK_DIR}/mmbalance-build")
set(prefix "${WORK_DIR}/prefix")

# The LibTorch of the build under test (PREFIX_PATH, '|'-separated), its CUDA toolkit and
# NCCL setting, for both the install and the consumer.
# The LibTorch's prefixes travel in the environment: a ';' inside one argument would be
# split by run()'s argument list.
string(REPLACE "|" ":" prefix_path "${PREFIX_PATH}")
set(ENV{CMAKE_PREFIX_PATH} "${prefix_path}")
set(torch_args)
if(CUDA_COMPILER)
  list(APPEND torch_args "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}" "-DCUDA_TOOLKIT_ROOT_DIR=${CUDA_ROOT}")
endif()
if(NCCL)
  list(APPEND torch_args -DMMBALANCE_NCCL=ON)
endif()

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}")
  endif()
endfunction()

run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${build}" -DCMAKE_INSTALL_PREFIX=${prefix}
    ${torch_args}
    -DMMBALANCE_BUILD_TESTS=OFF -DMMBALANCE_BUILD_EXAMPLES=OFF -DMMBALANCE_INSTALL=ON)
run(${CMAKE_COMMAND} --install "${build}")
foreach(f include/mmbalance/mmbalance.h share/cmake/mmbalance/mmbalanceConfig.cmake
          share/cmake/mmbalance/mmbalanceConfigVersion.cmake)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "not installed: ${f}")
  endif()
endforeach()
run(${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${WORK_DIR}/consumer-build"
    -DCMAKE_PREFIX_PATH=${prefix} ${torch_args} -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
run("${WORK_DIR}/consumer-build/consumer")
