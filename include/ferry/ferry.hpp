// ferry/ferry.hpp — the base layer in one include. The dataflow layer (ferry/flow/...) is
// opt-in and included separately.
#pragma once

#include <ferry/error.hpp>
#include <ferry/thread_pool.hpp>
#include <ferry/context.hpp>
#include <ferry/co_spawn.hpp>
#include <ferry/threaded.hpp>
#include <ferry/sync_wait.hpp>
#include <ferry/from_thread_channel.hpp>
#include <ferry/threaded_iterable.hpp>
#include <ferry/shared_context.hpp>
#include <ferry/entrypoint.hpp>
