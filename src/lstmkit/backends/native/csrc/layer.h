// What the two kernels (recurrence.cpp, inference.cpp) share about a layer's arguments: the rows
// running at each step, and a parameter's data or null where the cell has none.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace lstmkit {
namespace {

using at::Tensor;
using std::int64_t;

// Running rows at each step: batch_sizes, or `batch` at every step when it is empty.
std::vector<int64_t> running(at::IntArrayRef batch_sizes, int64_t steps, int64_t batch) {
  if (batch_sizes.empty()) return std::vector<int64_t>(steps, batch);
  TORCH_CHECK(static_cast<int64_t>(batch_sizes.size()) == steps, "batch_sizes has ",
              batch_sizes.size(), " entries for ", steps, " steps");
  int64_t previous = batch;
  for (const int64_t n : batch_sizes) {
    TORCH_CHECK(0 <= n && n <= previous, "batch_sizes must be non-increasing in [0, ", batch,
                "], got ", batch_sizes);
    previous = n;
  }
  return batch_sizes.vec();
}

template <typename T>
const T* pointer(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace
}  // namespace lstmkit
