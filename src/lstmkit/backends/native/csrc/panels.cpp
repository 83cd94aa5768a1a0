// The register-blocked product kernel of the float32 kernels (declared in panels.h): packing a
// weight into panels, the row tiles that accumulate A times a panel in vector registers over K,
// `product`, which picks the tiles for a number of rows, `product_beside` (a one-row product
// with another's tiles in its loops), the dot products of a weight read plain (a one-step call),
// and the large products with blocks of rows shared between threads: lstmkit::linear and
// lstmkit::weight_gradients (training's dW_ih and dW_hh, from dL/dz^T read as it lies).

#include "panels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string_view>

#include "layer.h"
#include "pool.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lstmkit {
namespace {

#if defined(__AVX2__)
// dst[i * ld] (8 floats) = column i of the 8 x 8 block whose rows are src[j * ld_src], j < 8.
void transpose8(const float* src, int64_t ld_src, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(src + j * ld_src);
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
    r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
    r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
    r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ld, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ld, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}
#endif

// sums[q] = a . w[q] over k values, for kCols weight rows at once.
template <int kCols>
void dots(const float* a, const float* const* w, int64_t k, float* sums) {
  Vec acc[kCols];
  for (int q = 0; q < kCols; ++q) acc[q] = broadcast(0.0f);
  int64_t e = 0;
  for (; e + kLanes <= k; e += kLanes) {
    const Vec x = load(a + e);
#pragma GCC unroll 8
    for (int q = 0; q < kCols; ++q) acc[q] = fma(x, load(w[q] + e), acc[q]);
  }
  if constexpr (kCols == 8) {
    lane_sums8(acc, sums);
  } else {
    for (int q = 0; q < kCols; ++q) {
      float lanes[kLanes];
      store(lanes, acc[q]);
      sums[q] = 0.0f;
      for (const float lane : lanes) sums[q] += lane;
    }
  }
  for (int q = 0; q < kCols; ++q) {
    for (int64_t i = e; i < k; ++i) sums[q] += a[i] * w[q][i];
  }
}

// out[r][c] for the n rows and a plain operand's columns: `init` (or zero; or, with
// `accumulate`, out itself) plus A[r] . W[c], eight columns at a time: one vector of A feeds
// eight independent sums.
void plain_product(const Operand& op, int64_t n, const float* init, bool accumulate,
                   float* const* out) {
  constexpr int kCols = 8;
  for (int64_t c = 0; c < op.columns; c += kCols) {
    const int64_t count = std::min<int64_t>(kCols, op.columns - c);
    for (int64_t r = 0; r < n; ++r) {
      float sums[kCols];
      if (count == kCols) {
        dots<kCols>(op.rows[r], op.plain + c, op.k, sums);
      } else {
        for (int64_t q = 0; q < count; ++q) dots<1>(op.rows[r], op.plain + c + q, op.k, sums + q);
      }
      for (int64_t q = 0; q < count; ++q) {
        const float base = accumulate ? out[r][c + q] : init != nullptr ? init[c + q] : 0.0f;
        out[r][c + q] = base + sums[q];
      }
    }
  }
}

// The depth of one pass over a panel: each row tile reads that slice of it (with AVX2, 256 x
// kPanel floats, 16 KB, which stays in the level-1 cache; tuned on a Zen 3) and loads and stores
// its sums once per pass. With AVX-512, 1024: the two panels of a tile (256 KB) come from the
// level-2 cache, and the sums of K <= 1024 are loaded and stored once. Measured on an AMD EPYC
// Zen 4 (family 25 model 17, 32 KB level-1), time at 1024 / at 128 (16 KB a panel): inference
// at 2 threads L 0.92, D 0.93, M 0.95, D2 0.98, S and T1 1.00; training L 0.95, D 0.96; at 1
// thread 256 / 128 0.96 and 512 / 256 0.97-1.00. On the Intel Xeon (48 KB level-1) 64 to 1024
// made no difference beyond noise.
constexpr int64_t kDepth = kLanes == 16 ? 1024 : 4096 / kPanel;

// Rows [first, last) of `panels` panels of a packed weight whose first panel starts at `base`,
// the panels `stride` floats apart: the part of a weight that the tiles after the running ones
// read first.
struct Slice {
  const float* base = nullptr;
  int64_t stride = 0;
  int panels = 0;
  int64_t first = 0, last = 0;
};

constexpr int64_t kLineFloats = 64 / sizeof(float);  // a cache line's

// What one tile fetches into the level-2 cache for the tiles after it, a row of `panels` panels
// (from `row` on, `count` of them) every `every` of its iterations.
struct Fetch {
  const float* row = nullptr;
  int64_t stride = 0;
  int panels = 0;
  int64_t count = 0;
  int64_t every = 1;
};

// Tile t's share of fetching `next` (rows first .. last), spread over its k1 - k0 iterations, of
// `tiles` tiles that read the same panels.
Fetch share(const Slice& next, int64_t t, int64_t tiles, int64_t k0, int64_t k1) {
  if (next.base == nullptr) return {};
  const int64_t rows = next.last - next.first;
  const int64_t first = next.first + rows * t / tiles,
                count = next.first + rows * (t + 1) / tiles - first;
  return {next.base + first * kPanel, next.stride, next.panels, count,
          std::max<int64_t>(1, (k1 - k0) / std::max<int64_t>(1, count))};
}

// out[r][columns of panels p .. p + kPanels) for kRows rows, r0 on: `init` (a bias padded to
// whole panels, or null for zero; or, with `accumulate`, out itself) plus A[r][k0, k1) times
// the weight's rows k0 .. k1. The weight's vectors are pinned into registers (simd.h's pin); it
// fetches `fetch` on the way.
template <int kRows, int kPanels>
void tile(const Operand& op, int64_t k0, int64_t k1, int64_t p, int64_t r0, const float* init,
          bool accumulate, float* const* out, const Fetch& fetch = Fetch()) {
  constexpr int kVecs = 2 * kPanels;
  Vec acc[kRows][kVecs];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      const int64_t column = p * kPanel + v * kLanes;
      acc[r][v] = accumulate        ? load(out[r0 + r] + column)
                  : init != nullptr ? load(init + column)
                                    : broadcast(0.0f);
    }
  }
  const float* a[kRows];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) a[r] = op.rows[r0 + r];
  const float* b = op.packed + (p * op.k + k0) * kPanel;
  const float* ahead = fetch.row;
  int64_t left = fetch.count, wait = 1;
  for (int64_t e = k0; e < k1; ++e, b += kPanel) {
    if (left > 0 && --wait == 0) {
      wait = fetch.every;
      --left;
      for (int q = 0; q < fetch.panels; ++q) {
        for (int64_t f = 0; f < kPanel; f += kLineFloats) {
          __builtin_prefetch(ahead + q * fetch.stride + f, 0, 2);  // to the level-2 cache
        }
      }
      ahead += kPanel;
    }
#pragma GCC unroll 4
    for (int q = 0; q < kPanels; ++q) {
      Vec w0 = load(b + q * op.k * kPanel), w1 = load(b + q * op.k * kPanel + kLanes);
      pin(w0);
      pin(w1);
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) {
        const Vec x = broadcast(a[r][e]);
        acc[r][2 * q] = fma(x, w0, acc[r][2 * q]);
        acc[r][2 * q + 1] = fma(x, w1, acc[r][2 * q + 1]);
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) store(out[r0 + r] + p * kPanel + v * kLanes, acc[r][v]);
  }
}

// A tile of `rows` (at most kRows) rows of kPanels panels.
template <int kRows, int kPanels = 1>
void row_tile(int rows, const Operand& op, int64_t k0, int64_t k1, int64_t p, int64_t r0,
              const float* init, bool accumulate, float* const* out, const Fetch& fetch = Fetch()) {
  if constexpr (kRows > 1) {
    if (rows < kRows)
      return row_tile<kRows - 1, kPanels>(rows, op, k0, k1, p, r0, init, accumulate, out, fetch);
  }
  tile<kRows, kPanels>(op, k0, k1, p, r0, init, accumulate, out, fetch);
}

// Panels [p, p + width) (those of them that exist) of op's rows [k0, k1).
Slice slice(const Operand& op, int64_t count_panels, int64_t p, int width, int64_t k0, int64_t k1) {
  if (op.packed == nullptr || p >= count_panels) return {};
  return {op.packed + p * op.k * kPanel, op.k * kPanel,
          static_cast<int>(std::min<int64_t>(width, count_panels - p)), k0, k1};
}

// Row tiles of kPanels panels, from panel p while kPanels of them remain, each of at most
// kMaxRows / kPanels of the n rows (so as many sums in flight), their heights as even as they
// go (8 = 4 + 4); the first panel left.
template <int kPanels>
int64_t row_tiles(const Operand& op, int64_t k0, int64_t k1, int64_t p, int64_t n,
                  int64_t count_panels, const float* init, bool accumulate, float* const* out,
                  const Slice* after = nullptr) {
  constexpr int kRows = kMaxRows / kPanels;
  const int64_t tiles = (n + kRows - 1) / kRows;
  for (; p + kPanels <= count_panels; p += kPanels) {
    const Slice next = after == nullptr ? Slice()
                       : p + kPanels < count_panels
                           ? slice(op, count_panels, p + kPanels, kPanels, k0, k1)
                           : *after;
    for (int64_t t = 0, r = 0; t < tiles; ++t) {
      const int rows = static_cast<int>((n - r) / (tiles - t));
      row_tile<kRows, kPanels>(rows, op, k0, k1, p, r, init, accumulate, out,
                               share(next, t, tiles, k0, k1));
      r += rows;
    }
  }
  return p;
}

// A one-row product's tile beside a side tile (see product_beside): kOne panels of the row
// (`op`, panels p on, onto out_row) and kRows rows of the side by kSide panels (its rows r0 on,
// its panels q on, from its bias), in one loop over their common K. 32 registers: 8 + 16 sums,
// 4 weight vectors and 2 broadcasts; 16: 4 + 4 sums, 2 weight vectors.
constexpr int kOnePanels = kLanes == 16 ? 4 : 2;
constexpr int kSideRows = kLanes == 16 ? 4 : 2;
constexpr int kSidePanels = kLanes == 16 ? 2 : 1;

void fused_tile(const Operand& op, int64_t p, float* out_row, const Side& side, int64_t r0,
                int64_t q) {
  constexpr int kOneVecs = 2 * kOnePanels, kSideVecs = 2 * kSidePanels;
  const Operand& s = side.op;
  Vec acc[kOneVecs], sums[kSideRows][kSideVecs];
#pragma GCC unroll 8
  for (int v = 0; v < kOneVecs; ++v) acc[v] = load(out_row + p * kPanel + v * kLanes);
#pragma GCC unroll 4
  for (int r = 0; r < kSideRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kSideVecs; ++v) {
      sums[r][v] =
          side.bias != nullptr ? load(side.bias + q * kPanel + v * kLanes) : broadcast(0.0f);
    }
  }
  const float* const a = op.rows[0];
  const float* x[kSideRows];
#pragma GCC unroll 4
  for (int r = 0; r < kSideRows; ++r) x[r] = s.rows[r0 + r];
  const float* b = op.packed + p * op.k * kPanel;
  const float* c = s.packed + q * s.k * kPanel;
  const int64_t common = std::min(op.k, s.k);
  for (int64_t e = 0; e < common; ++e, b += kPanel, c += kPanel) {
    Vec w[kSideVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kSideVecs; ++v) {
      w[v] = load(c + (v / 2) * s.k * kPanel + (v % 2) * kLanes);
      pin(w[v]);
    }
    const Vec h = broadcast(a[e]);
#pragma GCC unroll 8
    for (int v = 0; v < kOneVecs; ++v) {
      acc[v] = fma(h, load(b + (v / 2) * op.k * kPanel + (v % 2) * kLanes), acc[v]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < kSideRows; ++r) {
      const Vec xr = broadcast(x[r][e]);
#pragma GCC unroll 4
      for (int v = 0; v < kSideVecs; ++v) sums[r][v] = fma(xr, w[v], sums[r][v]);
    }
  }
  for (int64_t e = common; e < op.k; ++e, b += kPanel) {  // the longer K's rest
    const Vec h = broadcast(a[e]);
#pragma GCC unroll 8
    for (int v = 0; v < kOneVecs; ++v) {
      acc[v] = fma(h, load(b + (v / 2) * op.k * kPanel + (v % 2) * kLanes), acc[v]);
    }
  }
  for (int64_t e = common; e < s.k; ++e, c += kPanel) {
#pragma GCC unroll 4
    for (int r = 0; r < kSideRows; ++r) {
      const Vec xr = broadcast(x[r][e]);
#pragma GCC unroll 4
      for (int v = 0; v < kSideVecs; ++v) {
        sums[r][v] = fma(xr, load(c + (v / 2) * s.k * kPanel + (v % 2) * kLanes), sums[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < kOneVecs; ++v) store(out_row + p * kPanel + v * kLanes, acc[v]);
#pragma GCC unroll 4
  for (int r = 0; r < kSideRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kSideVecs; ++v)
      store(side.out[r0 + r] + q * kPanel + v * kLanes, sums[r][v]);
  }
}

// Side tile `index`: row tile index % row_tiles (kSideRows rows), panel group index / row_tiles
// (kSidePanels panels); the last of each may be short.
struct SideTile {
  int64_t r0, rows, q, count;
};

SideTile side_tile(const Side& side, int64_t index) {
  const int64_t row_tiles = (side.rows + kSideRows - 1) / kSideRows;
  const int64_t r0 = index % row_tiles * kSideRows, q = index / row_tiles * kSidePanels;
  return {r0, std::min<int64_t>(kSideRows, side.rows - r0), q,
          std::min<int64_t>(kSidePanels, side.count_panels - q)};
}

// A side tile on its own (short ones, and those a product has no room for beside it).
void side_alone(const Side& side, const SideTile& tile) {
  for (int64_t q = tile.q; q < tile.q + tile.count; ++q) {
    row_tile<kSideRows>(static_cast<int>(tile.rows), side.op, 0, side.op.k, q, tile.r0, side.bias,
                        false, side.out);
  }
}

// rows[r] = row r of `a`'s rows [r0, r0 + count) (k floats each), a being a transposed view
// (a[i][e] at src[e * ld + i]): copied into `buffer` in 8 x 8 blocks.
void transpose_rows(const float* src, int64_t ld, int64_t r0, int64_t count, int64_t k,
                    float* buffer, const float** rows) {
  for (int64_t r = 0; r < count; ++r) rows[r] = buffer + r * k;
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= count; i += 8) {
    int64_t e = 0;
    for (; e + 8 <= k; e += 8) transpose8(src + e * ld + r0 + i, ld, buffer + i * k + e, k);
    for (; e < k; ++e) {
      for (int64_t j = 0; j < 8; ++j) buffer[(i + j) * k + e] = src[e * ld + r0 + i + j];
    }
  }
#endif
  for (; i < count; ++i) {
    for (int64_t e = 0; e < k; ++e) buffer[i * k + e] = src[e * ld + r0 + i];
  }
}

}  // namespace

int64_t side_tiles(const Side& side) {
  const int64_t groups = (side.count_panels + kSidePanels - 1) / kSidePanels;
  return (side.rows + kSideRows - 1) / kSideRows * groups;
}

bool runs_beside(const Operand& op, const Operand& side) {
  return op.plain == nullptr && side.plain == nullptr && op.k <= kDepth && side.k <= kDepth;
}

void product_beside(const Operand& op, int64_t count_panels, float* const* out, Side& side,
                    int64_t quota) {
  const int64_t end = std::min(side_tiles(side), side.done + quota);
  int64_t p = 0;
  for (; p + kOnePanels <= count_panels; p += kOnePanels) {
    SideTile next{};
    while (side.done < end) {  // short tiles on their own, until a whole one
      next = side_tile(side, side.done);
      if (next.rows == kSideRows && next.count == kSidePanels) break;
      side_alone(side, next);
      ++side.done;
    }
    if (side.done < end) {
      fused_tile(op, p, out[0], side, next.r0, next.q);
      ++side.done;
    } else {
      tile<1, kOnePanels>(op, 0, op.k, p, 0, nullptr, true, out);
    }
  }
  if (p < count_panels) row_tiles<1>(op, 0, op.k, p, 1, count_panels, nullptr, true, out);
  for (; side.done < end; ++side.done) side_alone(side, side_tile(side, side.done));
}

Tensor pack_rows(const std::vector<const float*>& rows, int64_t n) {
  const int64_t k = static_cast<int64_t>(rows.size());
  Tensor packed = pooled({panels(n) * k * kPanel}, at::kFloat);
  float* const out = packed.data_ptr<float>();
  at::parallel_for(0, panels(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t width = std::min(kPanel, n - p * kPanel);
      for (int64_t e = 0; e < k; ++e) {
        float* row = out + (p * k + e) * kPanel;
        std::memcpy(row, rows[e] + p * kPanel, width * sizeof(float));
        std::fill(row + width, row + kPanel, 0.0f);
      }
    }
  });
  return packed;
}

Tensor pack(const Tensor& weight) {
  const int64_t n = weight.size(0), k = weight.size(1);
  if (weight.stride(0) == 1 && weight.stride(1) == n && n > 1) {
    const float* src = weight.const_data_ptr<float>();
    std::vector<const float*> rows(k);
    for (int64_t e = 0; e < k; ++e) rows[e] = src + e * n;
    return pack_rows(rows, n);
  }
  const Tensor w = weight.contiguous();
  Tensor packed = at::empty({panels(n) * k * kPanel}, w.options());
  const float* src = w.const_data_ptr<float>();
  float* const out = packed.data_ptr<float>();
  at::parallel_for(0, panels(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dst = out + p * k * kPanel;
      const float* rows = src + p * kPanel * k;
      const int64_t width = std::min(kPanel, n - p * kPanel);
      int64_t e = 0;
#if defined(__AVX2__)
      if (width == kPanel) {  // 8 x 8 blocks
        for (; e + 8 <= k; e += 8) {
          for (int64_t j = 0; j < kPanel; j += 8) {
            transpose8(rows + j * k + e, k, dst + e * kPanel + j, kPanel);
          }
        }
      }
#endif
      for (; e < k; ++e) {
        for (int64_t j = 0; j < kPanel; ++j)
          dst[e * kPanel + j] = j < width ? rows[j * k + e] : 0.0f;
      }
    }
  });
  return packed;
}

Tensor unit_rows(const Tensor& t, int64_t block, int64_t j0, int64_t width) {
  if (width == block) return t;
  std::vector<Tensor> parts;
  for (int64_t g = 0; g < t.size(0) / block; ++g)
    parts.push_back(t.narrow(0, g * block + j0, width));
  return at::cat(parts);
}

Weight prepare(const Tensor& weight, int64_t block, int64_t j0, int64_t width, bool plain) {
  const Tensor w = weight.contiguous();
  if (!plain) return {pack(unit_rows(w, block, j0, width)), Tensor(), {}};
  Weight out{Tensor(), w, {}};
  const float* const data = w.const_data_ptr<float>();
  const int64_t k = w.size(1);
  out.plain.reserve(w.size(0) / block * width);
  for (int64_t g = 0; g < w.size(0) / block; ++g) {
    for (int64_t j = 0; j < width; ++j) out.plain.push_back(data + (g * block + j0 + j) * k);
  }
  return out;
}

Operand operand(const float* const* rows, const Weight& weight, int64_t k) {
  return {rows, pointer<float>(weight.packed), k,
          weight.plain.empty() ? nullptr : weight.plain.data(),
          static_cast<int64_t>(weight.plain.size())};
}

bool fetches(int64_t rows, int64_t weight_bytes) {
  return rows > 2 && weight_bytes > level2_bytes();
}

Tiling tiling() {
  const std::string_view panels = forced("LSTMKIT_NATIVE_TILE");
  const std::string_view fetch = forced("LSTMKIT_NATIVE_FETCH");
  return {panels == "1"    ? 1
          : panels == "2"  ? 2
          : kMaxRows == 12 ? 2
                           : 1,
          fetch == "on"    ? std::optional<bool>(true)
          : fetch == "off" ? std::optional<bool>(false)
                           : std::nullopt};
}

void product(const Operand* ops, int count, int64_t n, int64_t count_panels, const float* bias,
             float* const* out, const Tiling& tiling, bool onto_out) {
  bool accumulate = onto_out;
  int64_t depth = 0;
  for (int o = 0; o < count; ++o) depth += ops[o].packed != nullptr ? ops[o].k : 0;
  const bool fetch =
      tiling.fetch.has_value()
          ? *tiling.fetch
          : fetches(n, depth * count_panels * kPanel * static_cast<int64_t>(sizeof(float)));
  for (int o = 0; o < count; ++o) {
    const Operand& op = ops[o];
    if (op.plain != nullptr) {
      plain_product(op, n, bias, accumulate, out);
      accumulate = true;
      continue;
    }
    for (int64_t k0 = 0; k0 < op.k; k0 += kDepth, accumulate = true) {
      const int64_t k1 = std::min(op.k, k0 + kDepth);
      int64_t p = 0;
      if (n <= 2) {
        for (; p + 4 / n <= count_panels; p += 4 / n) {
          if (n == 1) {
            tile<1, 4>(op, k0, k1, p, 0, bias, accumulate, out);
          } else {
            tile<2, 2>(op, k0, k1, p, 0, bias, accumulate, out);
          }
        }
      }
      // what the tiles after this pass read first: the next pass's first panels, the next
      // operand's, or the first operand's again (the next call's: a recurrence's next step)
      const Operand& following = k1 < op.k ? op : ops[(o + 1) % count];
      const int64_t f0 = k1 < op.k ? k1 : 0;
      const Slice after =
          slice(following, count_panels, 0, tiling.panels, f0, std::min(following.k, f0 + kDepth));
      const Slice* const ahead = fetch ? &after : nullptr;
      if (n > 2 && tiling.panels == 2) {
        p = row_tiles<2>(op, k0, k1, p, n, count_panels, bias, accumulate, out, ahead);
      }
      row_tiles<1>(op, k0, k1, p, n, count_panels, bias, accumulate, out, ahead);
    }
  }
}

// Rows of `a` per block that one thread takes at a time in linear, at most: the block's
// products keep their rows in the level-2 cache while the weight's panels stream past. Measured
// on an AMD EPYC Zen 4 (family 25 model 17) at 6400 x 512 x 2048 and 3200 x 256 x 1024 and
// their backward shapes: 24 and 48 rows the same, 96 and 192 up to 5% slower. Fewer rows give
// each thread four blocks or more, so that the threads finish together.
constexpr int64_t kLinearRows = 48;
constexpr int64_t kLinearBlocksPerThread = 4;

std::vector<Tensor> linears(const Tensor& a, const std::vector<Packed>& weights) {
  const int64_t m = a.size(0), k = a.size(1);
  // a's rows where they lie; a transposed view (stride(0) == 1: the weight gradients' dL/dz^T,
  // (4H, T B)) is transposed a block of rows at a time into each thread's buffer, not copied
  // whole: a fresh 52 MB copy (L's) cost 50-60 ms at 1 thread on an AMD EPYC Zen 4, most of it
  // the first touch of its pages, as much as ATen's copy; a block's buffer is touched once,
  // and serves every weight.
  const bool transposed = m > 1 && a.stride(0) == 1 && a.stride(1) != 1;
  const Tensor rows_of_a = transposed ? a : a.contiguous();
  std::vector<Tensor> outs;
  for (const Packed& weight : weights) {  // rows padded to whole panels
    outs.push_back(pooled({m, panels(weight.n) * kPanel}, at::kFloat));
  }
  const float* const a_p = rows_of_a.const_data_ptr<float>();
  std::vector<float*> out_p;
  for (Tensor& out : outs) out_p.push_back(out.data_ptr<float>());
  const Tiling layout = tiling();
  const int64_t least = kLinearBlocksPerThread * at::get_num_threads();
  const int64_t height = std::clamp<int64_t>((m + least - 1) / least, 1, kLinearRows);
  at::parallel_for(0, (m + height - 1) / height, 1, [&](int64_t begin, int64_t end) {
    const float* rows[kLinearRows];
    float* out_rows[kLinearRows];
    std::vector<float> buffer(transposed ? height * k : 0);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * height, count = std::min(height, m - r0);
      if (transposed) {
        transpose_rows(a_p, rows_of_a.stride(1), r0, count, k, buffer.data(), rows);
      } else {
        for (int64_t r = 0; r < count; ++r) rows[r] = a_p + (r0 + r) * k;
      }
      for (size_t w = 0; w < weights.size(); ++w) {
        const int64_t width = outs[w].size(1);
        for (int64_t r = 0; r < count; ++r) out_rows[r] = out_p[w] + (r0 + r) * width;
        const Operand op{rows, weights[w].packed.const_data_ptr<float>(), k};
        product(&op, 1, count, panels(weights[w].n), pointer<float>(weights[w].init), out_rows,
                layout);
      }
    }
  });
  for (size_t w = 0; w < weights.size(); ++w) {
    if (outs[w].size(1) != weights[w].n) outs[w] = outs[w].narrow(1, 0, weights[w].n).contiguous();
  }
  return outs;
}

Tensor linear(const Tensor& a_in, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(a_in.device().is_cpu() && a_in.scalar_type() == at::kFloat && a_in.dim() >= 1 &&
                  weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.size(1) == a_in.size(-1),
              "lstmkit::linear takes float32 CPU a (..., K) and weight (N, K), got a ",
              a_in.scalar_type(), " ", a_in.sizes(), " and weight ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t k = weight.size(1), n = weight.size(0);
  TORCH_CHECK(!bias.has_value() ||
                  (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n),
              "lstmkit::linear: bias must be float32 (", n, "), got ",
              bias.has_value() ? bias->sizes() : at::IntArrayRef{});
  std::vector<int64_t> shape(a_in.sizes().begin(), a_in.sizes().end());
  shape.back() = n;
  if (a_in.numel() == 0 || n == 0) {  // no rows, no columns, or no sum: the bias alone
    const Tensor zero = at::zeros(shape, a_in.options());
    return bias.has_value() ? zero + *bias : zero;
  }
  Tensor init = at::zeros({panels(n) * kPanel}, a_in.options());
  if (bias.has_value()) init.narrow(0, 0, n).copy_(*bias);
  return linears(a_in.reshape({-1, k}), {{pack(weight), n, init}})[0].view(shape);
}

std::tuple<Tensor, Tensor> weight_gradients(const Tensor& dz, const std::optional<Tensor>& x,
                                            const std::optional<Tensor>& h0,
                                            const std::optional<Tensor>& output) {
  const bool recurrent = h0.has_value();
  TORCH_CHECK(
      dz.scalar_type() == at::kFloat && dz.dim() == 3 && output.has_value() == recurrent &&
          (recurrent || x.has_value()) &&
          (!recurrent || (h0->dim() == 2 && output->dim() == 3 && output->size(0) == dz.size(0) &&
                          output->size(1) == dz.size(1) && h0->sizes() == (*output)[0].sizes())) &&
          (!x.has_value() ||
           (x->dim() == 3 && x->size(0) == dz.size(0) && x->size(1) == dz.size(1))),
      "lstmkit::weight_gradients takes float32 dz (T, B, G), x (T, B, I), h0 (B, P) and "
      "output (T, B, P), x or both of h0 and output, got dz ",
      dz.sizes(), ", x ", x.has_value() ? x->sizes() : at::IntArrayRef{}, ", h0 ",
      recurrent ? h0->sizes() : at::IntArrayRef{}, " and output ",
      output.has_value() ? output->sizes() : at::IntArrayRef{});
  const int64_t steps = dz.size(0), batch = dz.size(1), rows = steps * batch;
  const int64_t proj = recurrent ? h0->size(1) : 0;
  const auto options = dz.options();
  const auto none = [&options] { return at::empty({0}, options); };
  if (rows == 0 || dz.size(2) == 0) {  // no sum, or no rows of the gradients
    return {x.has_value() ? at::zeros({dz.size(2), x->size(2)}, options) : none(),
            recurrent ? at::zeros({dz.size(2), proj}, options) : none()};
  }
  // dz^T (G, T B) times [x] and [h0; output[0 .. T - 2]] (the recurrent product's inputs), both
  // packed from their rows as they lie
  const Tensor dz_t = dz.reshape({rows, dz.size(2)}).t();
  const auto rows_of = [](const Tensor& t, std::vector<const float*>& out) {
    const float* p = t.const_data_ptr<float>();
    for (int64_t r = 0; r < t.size(0); ++r) out.push_back(p + r * t.size(1));
  };
  std::vector<Packed> weights;
  Tensor xs, hs, previous;
  if (x.has_value()) {
    xs = x->reshape({rows, x->size(2)}).contiguous();
    std::vector<const float*> x_rows;
    rows_of(xs, x_rows);
    weights.push_back({pack_rows(x_rows, xs.size(1)), xs.size(1), Tensor()});
  }
  if (recurrent) {
    hs = h0->contiguous();
    std::vector<const float*> h_rows;
    rows_of(hs, h_rows);
    if (steps > 1) {
      previous = output->narrow(0, 0, steps - 1).reshape({(steps - 1) * batch, proj}).contiguous();
      rows_of(previous, h_rows);
    }
    weights.push_back({pack_rows(h_rows, proj), proj, Tensor()});
  }
  std::vector<Tensor> out = linears(dz_t, weights);
  return {x.has_value() ? out[0] : none(), recurrent ? out.back() : none()};
}

}  // namespace lstmkit
