// The pool of pool.h: an allocator whose freed blocks wait, pages and all, for a request of
// about their size. Blocks are reused where they are at most a quarter larger than asked (a
// step of the same shapes asks the same sizes again); beyond the limit, the block given back
// longest ago goes to the C library first.

#include "pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace lstmkit {
namespace {

// Below this, glibc's heap keeps and reuses freed blocks on its own.
constexpr size_t kPoolMinBytes = size_t{1} << 20;
constexpr size_t kPage = 4096;

// An eighth of the machine's memory, at most 1 GiB: a training step's buffers at the sizes
// above (~370 MB for layernorm) with room, and little on a small machine.
int64_t default_limit() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  const int64_t memory = pages > 0 && page > 0 ? int64_t{pages} * page : int64_t{8} << 30;
  return std::min<int64_t>(int64_t{1} << 30, memory / 8);
}

struct Block {
  void* data;
  size_t bytes;
  uint64_t freed;  // when it was given back, in give-backs
};

class Pool {
 public:
  Pool() : limit_(default_limit()) {
    // a child forked while another thread holds the lock would wait for it forever: hold it
    // across fork, then release it in both processes
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  // Never destroyed: tensors may give their blocks back while static objects are destroyed.
  static Pool& instance() {
    static Pool* const pool = new Pool();
    return *pool;
  }

  void* take(size_t wanted) {
    const size_t bytes = (wanted + kPage - 1) / kPage * kPage;
    std::lock_guard<std::mutex> hold(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->bytes >= bytes && it->bytes <= bytes + bytes / 4 &&
          (best == free_.end() || it->bytes < best->bytes)) {
        best = it;
      }
    }
    Block block{nullptr, bytes, 0};
    if (best != free_.end()) {
      block = *best;
      free_.erase(best);
      kept_ -= block.bytes;
    } else {
      block.data = c10::alloc_cpu(bytes);
    }
    in_use_ += block.bytes;
    sizes_[block.data] = block.bytes;
    report(block.data, static_cast<int64_t>(block.bytes));
    return block.data;
  }

  void give_back(void* data) {
    std::lock_guard<std::mutex> hold(mutex_);
    const auto found = sizes_.find(data);
    const size_t bytes = found->second;
    sizes_.erase(found);
    in_use_ -= bytes;
    free_.push_back({data, bytes, ++clock_});
    kept_ += bytes;
    report(data, -static_cast<int64_t>(bytes));
    trim();
  }

  int64_t set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> hold(mutex_);
    const int64_t before = limit_;
    limit_ = bytes;
    trim();
    return before;
  }

  int64_t limit() {
    std::lock_guard<std::mutex> hold(mutex_);
    return limit_;
  }
  int64_t kept() {
    std::lock_guard<std::mutex> hold(mutex_);
    return static_cast<int64_t>(kept_);
  }
  int64_t in_use() {
    std::lock_guard<std::mutex> hold(mutex_);
    return static_cast<int64_t>(in_use_);
  }

 private:
  // To torch.profiler's memory records, as torch's own CPU allocator does (a no-op unless it
  // records them).
  void report(void* data, int64_t change) const {
    c10::reportMemoryUsageToProfiler(data, change, in_use_, in_use_ + kept_,
                                     c10::Device(c10::DeviceType::CPU));
  }

  // Frees the blocks given back longest ago until what is kept is within the limit.
  void trim() {
    while (static_cast<int64_t>(kept_) > limit_) {
      const auto oldest =
          std::min_element(free_.begin(), free_.end(),
                           [](const Block& a, const Block& b) { return a.freed < b.freed; });
      c10::free_cpu(oldest->data);
      kept_ -= oldest->bytes;
      free_.erase(oldest);
    }
  }

  std::mutex mutex_;
  std::vector<Block> free_;                  // given back, kept
  std::unordered_map<void*, size_t> sizes_;  // in use: each block's size
  size_t kept_ = 0, in_use_ = 0;
  uint64_t clock_ = 0;
  int64_t limit_;
};

void give_back(void* data) { Pool::instance().give_back(data); }

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kPoolMinBytes) return c10::GetCPUAllocator()->allocate(bytes);
    void* data = Pool::instance().take(bytes);
    return {data, data, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

PoolAllocator& allocator() {
  static PoolAllocator* const pool = new PoolAllocator();
  return *pool;
}

}  // namespace

at::Tensor pooled(at::IntArrayRef shape, at::ScalarType dtype, bool zero) {
  at::Tensor out = at::detail::empty_generic(
      shape, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
  if (zero) std::memset(out.data_ptr(), 0, out.nbytes());
  return out;
}

int64_t pool_limit(int64_t bytes) { return Pool::instance().set_limit(bytes); }
int64_t pool_limit() { return Pool::instance().limit(); }
int64_t pool_kept() { return Pool::instance().kept(); }
int64_t pool_in_use() { return Pool::instance().in_use(); }

}  // namespace lstmkit
