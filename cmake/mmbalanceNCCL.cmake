# NCCL for mmbalance::distributed (CommBackend::nccl): c10d's ProcessGroupNCCL.hpp needs
# USE_C10D_NCCL, nccl.h, and the CUDA math libraries' headers (cuBLAS, cuSPARSE) that
# ATen/cuda/CUDAContext.h includes. A CUDA toolkit has the latter; a PyTorch wheel keeps
# all of them beside torch/, in nvidia/<package>/include (nvidia/cu13/include from CUDA 13).
#
# mmbalance_find_nccl(OUT_INCLUDE_DIRS): the folders to add, after checking that this
# LibTorch is a CUDA build; a clear error names what is missing.
function(mmbalance_find_nccl out_var)
  if(NOT TORCH_CUDA_LIBRARIES)
    message(FATAL_ERROR "MMBALANCE_NCCL: this LibTorch (${TORCH_INSTALL_PREFIX}) is not a CUDA "
                        "build; NCCL needs one")
  endif()
  file(GLOB wheel_dirs "${TORCH_INSTALL_PREFIX}/../nvidia/*/include")
  set(hints ${MMBALANCE_NCCL_INCLUDE_DIR} ${wheel_dirs} ${CUDAToolkit_INCLUDE_DIRS})
  set(dirs)
  foreach(header nccl.h cusparse.h cublas_v2.h)
    string(MAKE_C_IDENTIFIER "MMBALANCE_DIR_${header}" var)
    find_path(${var} ${header} HINTS ${hints})
    if(NOT ${var})
      message(FATAL_ERROR "MMBALANCE_NCCL: ${header} not found (looked in: ${hints}); set "
                          "MMBALANCE_NCCL_INCLUDE_DIR to the folder that holds it")
    endif()
    list(APPEND dirs ${${var}})
  endforeach()
  list(REMOVE_DUPLICATES dirs)
  set(${out_var} ${dirs} PARENT_SCOPE)
endfunction()
