# Builds a target that must not compile and checks that the compiler said every
# `// expect: MESSAGE` line of its source. Run with cmake -P (see tests/CMakeLists.txt):
#   -DBUILD_DIR=... -DTARGET=... -DSOURCE=...
execute_process(COMMAND ${CMAKE_COMMAND} --build "${BUILD_DIR}" --target "${TARGET}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(APPEND out "${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "${TARGET} compiled: every case in ${SOURCE} must be refused")
endif()
file(STRINGS "${SOURCE}" expectations REGEX "^// expect: ")
list(LENGTH expectations count)
if(count EQUAL 0)
  message(FATAL_ERROR "no '// expect:' lines in ${SOURCE}")
endif()
set(missing "")
foreach(line IN LISTS expectations)
  string(REGEX REPLACE "^// expect: " "" expected "${line}")
  string(FIND "${out}" "${expected}" at)
  if(at EQUAL -1)
    string(APPEND missing "\n  ${expected}")
  endif()
endforeach()
if(missing)
  message(FATAL_ERROR "${TARGET} failed to compile, but without these messages:${missing}\n"
                      "compiler output:\n${out}")
endif()
message(STATUS "${TARGET}: refused with all ${count} expected messages")
