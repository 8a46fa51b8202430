# FindAsio — standalone Asio (Debian: libasio-dev), which ships no CMake package config.
#
# Provides the imported target Asio::Asio (header-only, with Threads and ASIO_STANDALONE)
# and the variables Asio_FOUND, Asio_VERSION, Asio_INCLUDE_DIR.
# Honours find_package(Asio <version>) version requests; ferry needs >= 1.22.
include(FindPackageHandleStandardArgs)

find_path(Asio_INCLUDE_DIR NAMES asio/version.hpp
  DOC "Directory holding standalone Asio's asio/version.hpp (Debian: libasio-dev)")

if(Asio_INCLUDE_DIR AND EXISTS "${Asio_INCLUDE_DIR}/asio/version.hpp")
  file(STRINGS "${Asio_INCLUDE_DIR}/asio/version.hpp" _asio_version_line
       REGEX "^#define ASIO_VERSION [0-9]+")
  string(REGEX REPLACE "^#define ASIO_VERSION ([0-9]+).*" "\\1" _asio_version_num "${_asio_version_line}")
  math(EXPR _asio_major "${_asio_version_num} / 100000")
  math(EXPR _asio_minor "${_asio_version_num} / 100 % 1000")
  math(EXPR _asio_patch "${_asio_version_num} % 100")
  set(Asio_VERSION "${_asio_major}.${_asio_minor}.${_asio_patch}")
  unset(_asio_version_line)
  unset(_asio_version_num)
endif()

find_package_handle_standard_args(Asio
  REQUIRED_VARS Asio_INCLUDE_DIR
  VERSION_VAR Asio_VERSION
  REASON_FAILURE_MESSAGE
    "standalone Asio was not found. On Debian/Ubuntu install it with: sudo apt-get install libasio-dev")

if(Asio_FOUND AND NOT TARGET Asio::Asio)
  find_package(Threads REQUIRED)
  add_library(Asio::Asio INTERFACE IMPORTED)
  # Asio decides whether to allocate with aligned_alloc from a libstdc++ macro that only a
  # standard header defines, so the choice would depend on include order and differ
  # between translation units (an ODR violation ASan reports as alloc-dealloc-mismatch).
  # Fixing it here makes every TU that links Asio::Asio agree.
  set_target_properties(Asio::Asio PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${Asio_INCLUDE_DIR}"
    INTERFACE_COMPILE_DEFINITIONS "ASIO_STANDALONE;ASIO_NO_DEPRECATED;ASIO_HAS_STD_ALIGNED_ALLOC=1"
    INTERFACE_LINK_LIBRARIES Threads::Threads)
endif()
mark_as_advanced(Asio_INCLUDE_DIR)
