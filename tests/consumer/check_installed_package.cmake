# Installs mmbalance into a scratch prefix, then configures, builds and runs the consumer
# project against that prefix alone. Run with cmake -P (see tests/CMakeLists.txt).
file(REMOVE_RECURSE "${WORK_DIR}")
set(build "${WORK_DIR}/mmbalance-build")
set(prefix "${WORK_DIR}/prefix")

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}")
  endif()
endfunction()

run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${build}" -DCMAKE_INSTALL_PREFIX=${prefix}
    -DMMBALANCE_BUILD_TESTS=OFF -DMMBALANCE_BUILD_EXAMPLES=OFF -DMMBALANCE_INSTALL=ON)
run(${CMAKE_COMMAND} --install "${build}")
foreach(f include/mmbalance/mmbalance.h share/cmake/mmbalance/mmbalanceConfig.cmake
          share/cmake/mmbalance/mmbalanceConfigVersion.cmake)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "not installed: ${f}")
  endif()
endforeach()
run(${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${WORK_DIR}/consumer-build"
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build "${WORK_DIR}/consumer-build")
run("${WORK_DIR}/consumer-build/consumer")
