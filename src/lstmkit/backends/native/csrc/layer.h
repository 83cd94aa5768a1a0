// What the kernels (recurrence.cpp, inference.cpp, backward_rows.cpp) share about a layer: the
// rows running at each step, a worker's rows where threads share the batch, a parameter's data
// or null where the cell has none, and the routes the environment forces.
#pragma once

#include <ATen/ATen.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>
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

// Worker w's rows when `workers` share a batch by rows: w, w + workers, ... (increasing).
std::vector<int64_t> rows_of_worker(int64_t w, int64_t workers, int64_t batch) {
  std::vector<int64_t> rows;
  for (int64_t b = w; b < batch; b += workers) rows.push_back(b);
  return rows;
}

// How many of a worker's rows (increasing) run at a step where the first `running` rows of the
// batch do: a prefix of them, the batch being sorted by decreasing length.
int64_t running_prefix(const std::vector<int64_t>& rows, int64_t running) {
  int64_t n = 0;
  while (n < static_cast<int64_t>(rows.size()) && rows[n] < running) ++n;
  return n;
}

// A route that the environment variable `variable` forces (the tests run every one), or "".
std::string_view forced(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr ? value : "";
}

// A core's level-2 cache in bytes, as the C library reports it (512 KB where it does not).
int64_t level2_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t{512} << 10;
  }();
  return bytes;
}

}  // namespace
}  // namespace lstmkit
