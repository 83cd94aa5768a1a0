// Training's large buffers (every step's gates, cell states and their gradients: 13-52 MB each
// at B = 64, T = 100, H = 512) from a pool of freed blocks that keep their memory pages, instead
// of fresh mappings: glibc hands any block over 32 MB back to the kernel when it is freed, and
// the next step's first touch of each of its pages is a page fault the kernel clears (~25 ms
// for 52 MB on an AMD EPYC Zen 4; a layernorm training step at that size faulted 57,600 times,
// 150 ms of its 1190). The pool holds memory only, never values: every block is written by
// its new owner before it is read, as at::empty's are.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lstmkit {

// A CPU tensor of `shape` and `dtype`, uninitialised (zeroed with `zero`), from the pool where
// it is large (1 MB and up; below, from torch's allocator).
at::Tensor pooled(at::IntArrayRef shape, at::ScalarType dtype, bool zero = false);

// The bytes the pool may keep in freed blocks (oldest given back first beyond it); setting it
// gives back what is over at once. Returns the limit before the call.
int64_t pool_limit(int64_t bytes);
int64_t pool_limit();

// Bytes kept in freed blocks, and in blocks in use.
int64_t pool_kept();
int64_t pool_in_use();

}  // namespace lstmkit
