// The packed products that every float32 kernel of inference.cpp and backward_rows.cpp runs on,
// defined in panels.cpp: a weight packed into panels of kPanel columns, or read plain, and
// `product`, which adds rows of A times it into rows of out.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "simd.h"

namespace lstmkit {

using at::Tensor;

constexpr int64_t kPanel = 2 * kLanes;  // columns per packed panel: two vectors

inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

// A weight (n, k), packed: panel p holds columns [p kPanel, (p + 1) kPanel) of its transpose
// as k rows of kPanel floats (zeros past n), so that a tile reads it in order. A transposed
// view (of a (k, n) row-major tensor) is copied slice by slice, its rows being those panels'.
Tensor pack(const Tensor& weight);

// A weight (n, k) given as the k rows of its transpose (n floats each), packed as pack packs it.
Tensor pack_rows(const std::vector<const float*>& rows, int64_t n);

// A weight packed (pack, pack_rows), its rows (n), and what its products start from: a bias
// padded to whole panels, or undefined for zeros.
struct Packed {
  Tensor packed;
  int64_t n;
  Tensor init;
};

// a (m, k) times each weight: a W^T (+ its bias), (m, n) each. A transposed view (stride(0) ==
// 1) is read as it lies, a block of rows at a time, each block serving every weight.
std::vector<Tensor> linears(const Tensor& a, const std::vector<Packed>& weights);

// A weight as the products read it: packed, or (`plain`) its rows where they lie, one pointer
// per output column (k floats each). A call of one step takes the weights plain: packing them
// would cost more than the one product each serves (4 ms at H = 512).
struct Weight {
  Tensor packed, source;            // source: what `plain` points into, held alive
  std::vector<const float*> plain;  // empty when packed
};

// Rows [g block + j0, g block + j0 + width) of every block of `block` rows of t, the blocks in
// order (a worker's units in each gate's block): t itself where width == block.
Tensor unit_rows(const Tensor& t, int64_t block, int64_t j0, int64_t width);

// unit_rows of a weight (n, k), packed, or plain.
Weight prepare(const Tensor& weight, int64_t block, int64_t j0, int64_t width, bool plain);

// One operand of a product: rows of A by row pointers (each k floats) and a weight, packed or
// (`plain`, `columns` of them) as row pointers.
struct Operand {
  const float* const* rows;
  const float* packed;
  int64_t k;
  const float* const* plain = nullptr;
  int64_t columns = 0;
};

Operand operand(const float* const* rows, const Weight& weight, int64_t k);

// How a product tiles: `panels` panels per row tile where it has more than two rows, two with
// AVX-512's 32 registers (6 rows x 4 vectors, a weight vector feeding 6 sums and a broadcast 4,
// against 12 x 2: 2 weight loads and 12 broadcasts for 24 multiply-adds). Measured on an Intel
// Xeon (family 6, model 167), inference time / nn.LSTM's with one panel and with two: L 1.20 ->
// 1.01 at 2 threads and 1.14 -> 1.03 at 1, M 1.07 -> 0.99, D2 1.14 -> 1.04, S 0.54 -> 0.49. One
// with 16 registers (6 rows x 2 vectors, the tile tuned on a Zen 3; two panels there, 3 rows x 4,
// are not measured). LSTMKIT_NATIVE_TILE=1 or =2 forces either (tests).
// `fetch`: whether the row tiles fetch the panels that the tiles after them read first into the
// level-2 cache, where LSTMKIT_NATIVE_FETCH=on or =off forces it; empty: as `fetches` says.
struct Tiling {
  int panels;
  std::optional<bool> fetch;
};

// The tiling of the products of a call, from the environment's forcing variables (read once).
Tiling tiling();

// Whether the row tiles of a product of `rows` rows fetch ahead, its packed weights being
// `weight_bytes`: where more than two rows share the weights, which outgrow a core's level-2
// cache. A tile's weight comes from the level-2 cache, where the row tiles before it left it;
// but the first of a panel's row tiles finds it in the shared cache or memory, and the hardware's
// prefetcher, which stops at every 4 KB page, leaves it waiting (a panel's 1024 rows span 32
// pages). The rows each tile fetches are a share of the next panels', spread over its loop.
// Measured on an Intel Xeon (family 6 model 167, 2 MB level-2; 4 KB pages), time fetching /
// not, in one process, alternated: 1 thread, inference B = 8, H = 512 0.83-0.85, L 0.98-0.99,
// D2 0.98, M (2 MB of weights) 0.99-1.01, S 1.04-1.07 (128 KB), training L 0.94-0.97; 2 threads
// (each half the weights' rows): M and D2 (1 MB each) 1.07, L 0.98, training L 0.92, M 0.95.
// One or two rows (weights read once a step, 8 loads in 8 multiply-adds): B = 1, H = 512, 2
// threads 1.19.
bool fetches(int64_t rows, int64_t weight_bytes);

// out rows (n of them, each padded to whole panels, `count_panels` of them) = bias (or zero;
// or, `onto_out`, out itself) + the sum of the operands' products, kDepth of an operand's K at a
// time. One or two rows take several panels per tile, so that enough independent sums are in
// flight; more rows take tiling.panels panels per tile, then one.
void product(const Operand* ops, int count, int64_t n, int64_t count_panels, const float* bias,
             float* const* out, const Tiling& tiling, bool onto_out = false);

// The input half of a block of later steps, computed a few tiles at a time beside a one-row
// recurrent product (product_beside): the rows of `op` (rows of it) times its weight (packed)
// plus `bias` into `out`, `done` of its tiles so far.
struct Side {
  Operand op;
  int64_t rows = 0, count_panels = 0;
  const float* bias = nullptr;
  float* const* out = nullptr;
  int64_t done = 0;
};

// Tiles of a Side in all.
int64_t side_tiles(const Side& side);

// Whether product_beside runs these operands: both packed, each K within one pass of a panel.
bool runs_beside(const Operand& op, const Operand& side);

// product(&op, 1, 1, count_panels, nullptr, out, _, true), one row onto out[0], with `quota` of
// side's tiles (fewer where fewer remain) in the same loops. A one-row product waits for its
// weight from the level-2 cache with half of the core's multiply-adds idle (each weight value
// serves one row); the side's tiles, whose weight values each serve several rows from the
// level-1 cache, fill them.
void product_beside(const Operand& op, int64_t count_panels, float* const* out, Side& side,
                    int64_t quota);

}  // namespace lstmkit
