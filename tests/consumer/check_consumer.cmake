# Builds and runs the consumer project against mmbalance the way MODE says:
#   find_package      install mmbalance into a scratch prefix, then use that prefix alone
#   add_subdirectory  the source tree as a sub-project
#   FetchContent      the source tree through FetchContent (FETCHCONTENT_SOURCE_DIR_MMBALANCE)
# Run with cmake -P (see tests/CMakeLists.txt).
file(REMOVE_RECURSE "${WORK_DIR}")
set(build "${WORK_DIR}/mmbalance-build")
set(prefix "${WORK_DIR}/prefix")

# The LibTorch of the build under test (PREFIX_PATH, '|'-separated), its CUDA toolkit and
# NCCL setting, for both the install and the consumer.
# The LibTorch's prefixes travel in the environment: a ';' inside one argument would be
# split by run()'s argument list.
string(REPLACE "|" ":" prefix_path "${PREFIX_PATH}")
if(prefix_path AND DEFINED ENV{CMAKE_PREFIX_PATH} AND NOT "$ENV{CMAKE_PREFIX_PATH}" STREQUAL "")
  set(ENV{CMAKE_PREFIX_PATH} "${prefix_path}:$ENV{CMAKE_PREFIX_PATH}")
elseif(prefix_path)
  set(ENV{CMAKE_PREFIX_PATH} "${prefix_path}")
endif()
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

if(MODE STREQUAL "find_package")
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
  set(consume_args -DCMAKE_PREFIX_PATH=${prefix})
elseif(MODE STREQUAL "add_subdirectory")
  set(consume_args -DMMBALANCE_SOURCE_DIR=${SOURCE_DIR})
elseif(MODE STREQUAL "FetchContent")
  set(consume_args -DFETCHCONTENT_SOURCE_DIR_MMBALANCE=${SOURCE_DIR})
else()
  message(FATAL_ERROR "MODE must be find_package, add_subdirectory or FetchContent")
endif()
# No build type: the consumer checks CMake's packaging, not the optimizer, and compiles in
# half the time without optimization.
run(${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${WORK_DIR}/consumer-build"
    -DMMBALANCE_CONSUME=${MODE} ${consume_args} ${torch_args})
run(${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
run("${WORK_DIR}/consumer-build/consumer")
if(EXISTS "${WORK_DIR}/consumer-build/mmbalance/tests" OR
   EXISTS "${WORK_DIR}/consumer-build/_deps/mmbalance-build/tests")
  message(FATAL_ERROR "as a sub-project mmbalance must not configure its tests")
endif()
