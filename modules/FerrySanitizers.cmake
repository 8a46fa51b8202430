# FERRY_SANITIZE: "" | "address" (ASan + UBSan, halt on first error) | "thread" (TSan).
# Applied to every target of this project (library, tests, examples) so the whole program
# is instrumented; sanitizer runtime options for CTest live in CMakePresets.json.
set(FERRY_SANITIZE "" CACHE STRING "Sanitizer build: empty, address (ASan+UBSan) or thread (TSan)")
set_property(CACHE FERRY_SANITIZE PROPERTY STRINGS "" address thread)

if(FERRY_SANITIZE STREQUAL "address")
  add_compile_options(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined -fno-sanitize-recover=all)
elseif(FERRY_SANITIZE STREQUAL "thread")
  # g++ warns that TSan does not model atomic_thread_fence (moodycamel uses fences). ferry's
  # own code switches to read-modify-writes under TSan (see src/thread_pool.cpp), so the
  # warning is informational here and silenced to keep build logs readable.
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer -Wno-tsan)
  add_link_options(-fsanitize=thread)
elseif(NOT FERRY_SANITIZE STREQUAL "")
  message(FATAL_ERROR "FERRY_SANITIZE must be empty, 'address' or 'thread', not '${FERRY_SANITIZE}'")
endif()
