# Finds LibTorch (the PyPI wheel, through torch.utils.cmake_prefix_path on CMAKE_PREFIX_PATH) and
# exposes one target, sedd::torch, that carries it.
#
# When the wheel has CUDA we link the CUDA runtime and NCCL *from the wheel* (nvidia/cu13, nvidia/nccl),
# the very files libtorch_cuda.so loads, and drop the system toolkit's libcudart that TorchConfig adds:
# two copies of libcudart or libnccl in one process break CUDA contexts and NCCL communicators.
# A fixed arch list keeps TorchConfig from compiling a GPU-probe program.
#
# Our own CUDA kernels (*.cu: keyed randomness, fused model ops) are built when nvcc is found
# (SEDD_HAVE_CUDA_KERNELS); they link no CUDA runtime of their own (CMAKE_CUDA_RUNTIME_LIBRARY
# None) but the wheel's, like everything else.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
find_package(Torch REQUIRED)

get_filename_component(SEDD_TORCH_LIB_DIR "${TORCH_LIBRARY}" DIRECTORY)
get_filename_component(SEDD_SITE_PACKAGES "${SEDD_TORCH_LIB_DIR}/../.." ABSOLUTE)
message(STATUS "sedd: LibTorch ${Torch_VERSION} in ${SEDD_TORCH_LIB_DIR}")

set(SEDD_HAVE_CUDA OFF)
set(_sedd_torch_libs torch torch_library)
if(SEDD_WITH_CUDA AND EXISTS "${SEDD_TORCH_LIB_DIR}/libtorch_cuda.so")
  file(GLOB _nccl_lib "${SEDD_SITE_PACKAGES}/nvidia/nccl/lib/libnccl.so.2")
  file(GLOB _nccl_inc "${SEDD_SITE_PACKAGES}/nvidia/nccl/include")
  file(GLOB _cudart_lib "${SEDD_SITE_PACKAGES}/nvidia/cu1*/lib/libcudart.so.1*")
  if(_nccl_lib AND _nccl_inc AND _cudart_lib)
    list(GET _cudart_lib 0 _cudart_lib)
    set(SEDD_HAVE_CUDA ON)
    set(SEDD_NCCL_LIBRARY "${_nccl_lib}")
    set(SEDD_CUDART_LIBRARY "${_cudart_lib}")
    set(SEDD_NCCL_INCLUDE_DIR "${_nccl_inc}")
    message(STATUS "sedd: CUDA on; NCCL ${SEDD_NCCL_LIBRARY}; CUDA runtime ${SEDD_CUDART_LIBRARY}")
  else()
    message(WARNING "sedd: LibTorch has CUDA but the wheel's NCCL/CUDA runtime were not found; CUDA paths off")
  endif()
else()
  message(STATUS "sedd: CPU-only build")
endif()

# Our own interface target: torch's include dirs and flags, the wheel's libraries by full path.
add_library(sedd_torch INTERFACE)
add_library(sedd::torch ALIAS sedd_torch)
target_include_directories(sedd_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
target_compile_options(sedd_torch INTERFACE ${TORCH_CXX_FLAGS})
target_link_libraries(sedd_torch INTERFACE
  "${SEDD_TORCH_LIB_DIR}/libtorch.so" "${SEDD_TORCH_LIB_DIR}/libtorch_cpu.so" "${SEDD_TORCH_LIB_DIR}/libc10.so")
# Some wheels (torch 2.11) export copies of libstdc++'s std::filesystem functions from libtorch.so,
# and the dynamic linker binds our calls to the first definition it finds (those copies crash).
# libstdc++ named first among every executable's libraries makes its own definitions win.
target_link_options(sedd_torch INTERFACE "LINKER:--push-state,--no-as-needed" "-lstdc++" "LINKER:--pop-state")
if(SEDD_HAVE_CUDA)
  find_path(SEDD_CUDA_RUNTIME_INCLUDE cuda_runtime_api.h
            HINTS "${SEDD_SITE_PACKAGES}/nvidia/cu13/include" ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  target_include_directories(sedd_torch SYSTEM INTERFACE "${SEDD_NCCL_INCLUDE_DIR}" "${SEDD_CUDA_RUNTIME_INCLUDE}")
  target_compile_definitions(sedd_torch INTERFACE SEDD_HAVE_CUDA=1)
  target_link_libraries(sedd_torch INTERFACE
    -Wl,--no-as-needed "${SEDD_TORCH_LIB_DIR}/libtorch_cuda.so" -Wl,--as-needed
    "${SEDD_TORCH_LIB_DIR}/libc10_cuda.so" "${SEDD_NCCL_LIBRARY}" "${SEDD_CUDART_LIBRARY}")
endif()

set(SEDD_HAVE_CUDA_KERNELS OFF)
if(SEDD_HAVE_CUDA)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_RUNTIME_LIBRARY None)
    # TorchConfig turns CMAKE_CUDA_ARCHITECTURES off; our kernels name theirs on their target.
    set(SEDD_CUDA_ARCHS "80;90" CACHE STRING "GPU architectures of the CUDA kernels (A100, H100/H200)")
    set(CMAKE_CUDA_STANDARD 17)
    enable_language(CUDA)
    set(SEDD_HAVE_CUDA_KERNELS ON)
    message(STATUS "sedd: CUDA kernels on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${SEDD_CUDA_ARCHS})")
  else()
    message(WARNING "sedd: no nvcc found: the CUDA kernels are off (GPU paths fall back to LibTorch ops)")
  endif()
endif()
