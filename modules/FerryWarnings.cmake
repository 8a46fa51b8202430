# ferry_set_warnings(<target>) — the project's warning set. FERRY_WARNINGS_AS_ERRORS turns
# them into errors (the `dev` preset does). -Wconversion is kept: implicit narrowing in a
# concurrency library hides real bugs (counter truncation, size_t → int).
function(ferry_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE
      -Wall -Wextra -Wpedantic -Wconversion -Wsign-conversion -Wshadow
      -Wnon-virtual-dtor -Wold-style-cast -Woverloaded-virtual)
    if(FERRY_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()
