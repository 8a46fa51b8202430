// ferry/ferry.hpp — the base layer in one include. The dataflow layer (ferry/flow/...) is
// opt-in and included separately.
#pragma once

#include <ferry/error.hpp>
#include <ferry/thread_pool.hpp>
