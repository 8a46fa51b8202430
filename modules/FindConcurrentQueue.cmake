# FindConcurrentQueue — moodycamel::ConcurrentQueue (Debian: libconcurrentqueue-dev), which
# ships no CMake package config.
#
# Provides the imported target ConcurrentQueue::ConcurrentQueue (header-only). The include
# directory is the one holding concurrentqueue.h, so sources write
# #include <concurrentqueue.h> whatever the distribution's sub-folder is.
include(FindPackageHandleStandardArgs)

find_path(ConcurrentQueue_INCLUDE_DIR NAMES concurrentqueue.h
  PATH_SUFFIXES concurrentqueue concurrentqueue/moodycamel
  DOC "Directory holding moodycamel's concurrentqueue.h (Debian: libconcurrentqueue-dev)")

find_package_handle_standard_args(ConcurrentQueue
  REQUIRED_VARS ConcurrentQueue_INCLUDE_DIR
  REASON_FAILURE_MESSAGE
    "moodycamel concurrentqueue was not found. On Debian/Ubuntu install it with: sudo apt-get install libconcurrentqueue-dev")

if(ConcurrentQueue_FOUND AND NOT TARGET ConcurrentQueue::ConcurrentQueue)
  add_library(ConcurrentQueue::ConcurrentQueue INTERFACE IMPORTED)
  set_target_properties(ConcurrentQueue::ConcurrentQueue PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${ConcurrentQueue_INCLUDE_DIR}")
endif()
mark_as_advanced(ConcurrentQueue_INCLUDE_DIR)
