# Arrow C++ and Parquet from the PyPI pyarrow wheel in SEDD_PYTHON's virtualenv, for sedd-prepare's
# Parquet and Arrow IPC input. Sets SEDD_HAVE_ARROW and, when ON, the target sedd::arrow (headers,
# the wheel's libarrow/libparquet by full path, an RPATH to the wheel's folder so they are found
# at run time without LD_LIBRARY_PATH). Without pyarrow the build goes on without them.
#
# The wheel ships only versioned libraries (libarrow.so.2600), so they are linked by path. Which
# libstdc++ string ABI (_GLIBCXX_USE_CXX11_ABI) the wheel uses is found by linking a probe; when it
# differs from torch's, SEDD_ARROW_ABI_FLAGS carries the flags for the one translation unit that
# includes Arrow headers (its interface to the rest passes no std::string).
option(SEDD_WITH_ARROW "Parquet / Arrow input through the pyarrow wheel (when found)" ON)
set(SEDD_HAVE_ARROW OFF)
set(SEDD_ARROW_ABI_FLAGS "")

function(_sedd_arrow_probe abi out_var)
  set(dir "${CMAKE_BINARY_DIR}/CMakeFiles/sedd-arrow-probe-${abi}")
  file(WRITE "${dir}/probe.cpp" [=[
#include <arrow/io/file.h>
#include <arrow/status.h>
#include <parquet/arrow/reader.h>
// std::string in these signatures mangles differently under the two ABIs.
int main(int argc, char** argv) {
  auto file = arrow::io::ReadableFile::Open(argv[0]);
  auto reader = parquet::arrow::OpenFile(*file, arrow::default_memory_pool());
  return static_cast<int>(reader.status().ToString().size()) + argc;
}
]=])
  try_compile(ok "${dir}/build" SOURCES "${dir}/probe.cpp"
              CMAKE_FLAGS "-DINCLUDE_DIRECTORIES=${SEDD_ARROW_INCLUDE_DIR}"
              COMPILE_DEFINITIONS -D_GLIBCXX_USE_CXX11_ABI=${abi}
              LINK_LIBRARIES "${SEDD_PARQUET_LIBRARY}" "${SEDD_ARROW_LIBRARY}"
              CXX_STANDARD 20
              OUTPUT_VARIABLE log)
  set(${out_var} ${ok} PARENT_SCOPE)
endfunction()

if(SEDD_WITH_ARROW AND SEDD_PYTHON)
  execute_process(
    COMMAND "${SEDD_PYTHON}" -c "import pyarrow as pa; print(pa.__version__); print(pa.get_include()); print(pa.get_library_dirs()[0])"
    OUTPUT_VARIABLE _pa RESULT_VARIABLE _pa_rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_pa_rc EQUAL 0)
    string(REPLACE "\n" ";" _pa "${_pa}")
    list(GET _pa 0 _pa_version)
    list(GET _pa 1 SEDD_ARROW_INCLUDE_DIR)
    list(GET _pa 2 SEDD_ARROW_LIB_DIR)
    # The shortest match is the soname (libarrow.so.2600, not libarrow.so.2600.1.0).
    file(GLOB _arrow_libs "${SEDD_ARROW_LIB_DIR}/libarrow.so.[0-9]*")
    file(GLOB _parquet_libs "${SEDD_ARROW_LIB_DIR}/libparquet.so.[0-9]*")
    list(SORT _arrow_libs)
    list(SORT _parquet_libs)
    if(_arrow_libs AND _parquet_libs AND EXISTS "${SEDD_ARROW_INCLUDE_DIR}/parquet/arrow/reader.h")
      list(GET _arrow_libs 0 SEDD_ARROW_LIBRARY)
      list(GET _parquet_libs 0 SEDD_PARQUET_LIBRARY)
      # torch's ABI: what its flags say, else the compiler's default (the new ABI).
      set(_torch_abi 1)
      if("${TORCH_CXX_FLAGS}" MATCHES "_GLIBCXX_USE_CXX11_ABI=0")
        set(_torch_abi 0)
      endif()
      set(_probe_key "${SEDD_ARROW_LIBRARY};${CMAKE_CXX_COMPILER}")
      if(NOT DEFINED SEDD_ARROW_CXX11_ABI OR NOT "${SEDD_ARROW_PROBED}" STREQUAL "${_probe_key}")
        unset(SEDD_ARROW_CXX11_ABI CACHE)
        math(EXPR _other_abi "1 - ${_torch_abi}")
        foreach(_abi ${_torch_abi} ${_other_abi})
          _sedd_arrow_probe(${_abi} _linked)
          if(_linked)
            set(SEDD_ARROW_CXX11_ABI ${_abi} CACHE INTERNAL "libstdc++ string ABI of the pyarrow wheel")
            break()
          endif()
        endforeach()
        set(SEDD_ARROW_PROBED "${_probe_key}" CACHE INTERNAL "")
      endif()
      if(DEFINED SEDD_ARROW_CXX11_ABI)
        set(SEDD_HAVE_ARROW ON)
        if(NOT SEDD_ARROW_CXX11_ABI EQUAL _torch_abi)
          set(SEDD_ARROW_ABI_FLAGS -U_GLIBCXX_USE_CXX11_ABI -D_GLIBCXX_USE_CXX11_ABI=${SEDD_ARROW_CXX11_ABI})
        endif()
        add_library(sedd_arrow INTERFACE)
        add_library(sedd::arrow ALIAS sedd_arrow)
        target_include_directories(sedd_arrow SYSTEM INTERFACE "${SEDD_ARROW_INCLUDE_DIR}")
        # As needed: only executables whose code reads Parquet/Arrow (sedd-prepare, the tests)
        # load the wheel's libraries.
        target_link_libraries(sedd_arrow INTERFACE
          -Wl,--push-state,--as-needed "${SEDD_PARQUET_LIBRARY}" "${SEDD_ARROW_LIBRARY}" -Wl,--pop-state)
        target_link_options(sedd_arrow INTERFACE "LINKER:-rpath,${SEDD_ARROW_LIB_DIR}")
        message(STATUS "sedd: Parquet/Arrow input on (pyarrow ${_pa_version}, ${SEDD_ARROW_LIBRARY}, "
                       "_GLIBCXX_USE_CXX11_ABI=${SEDD_ARROW_CXX11_ABI})")
      else()
        message(WARNING "sedd: pyarrow ${_pa_version} found but a program linking its Arrow C++ libraries "
                        "fails under either libstdc++ ABI; Parquet/Arrow input is off")
      endif()
    else()
      message(WARNING "sedd: pyarrow ${_pa_version} has no Arrow C++ headers/libraries in ${SEDD_ARROW_LIB_DIR}; "
                      "Parquet/Arrow input is off")
    endif()
  else()
    message(STATUS "sedd: no pyarrow in ${SEDD_PYTHON}: Parquet/Arrow input is off")
  endif()
elseif(SEDD_WITH_ARROW)
  message(STATUS "sedd: SEDD_PYTHON not set: Parquet/Arrow input is off")
else()
  message(STATUS "sedd: SEDD_WITH_ARROW=OFF: Parquet/Arrow input is off")
endif()
