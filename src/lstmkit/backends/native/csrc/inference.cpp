// Float32 inference of one layer-direction in one kernel, lstmkit::inference: the input
// product, the recurrence and the gates of every step, for the lstm, peephole, cifg and
// layernorm cells, with projection, lengths (batch_sizes), a given state and zoneout's
// evaluation form. Nothing of size T x B x 4H is ever held: step t computes its own input half.
//
// Each worker thread owns rows of the batch (row w, w + W, w + 2W, ... of W workers) for the
// whole sequence, so the threads never wait for each other: no fork, join or barrier per step
// (ONNX Runtime shares its batch the same way). Per step and worker, on its n running rows:
//
//   z = b + x_t W_ih^T + h_{t-1} W_hh^T              one product, [x_t, h_{t-1}] by [W_ih; W_hh]
//   z = LN(x_t W_ih^T) + b + LN(h_{t-1} W_hh^T)      layernorm (two products, each normalised)
//   then the cell's pass over the gates (cell.h), the projection m W_hr^T where there is one,
//   and zoneout's expectation h_t = p h_{t-1} + (1 - p) h', c_t likewise.
//
// Or, for small batches, for 128 hidden units or more and for weights much larger than a core's
// cache (choose_split), each worker owns hidden units: every row, its share of the units and of the
// weights' rows, and waits once per step for the others' h_{t-1} (one progress flag per worker).
//
// Training of the same cells without masks uses the same row split both ways: training_forward
// runs this forward and keeps every step's gates and c_t (and layer norm's normalised values),
// and backward_kept walks each worker's rows back in time, dL/dh_{t-1} = dz_t W_hh on the same
// kernel.
//
// The products run on a small register-blocked kernel: the weights are packed at every call
// (never kept: a parameter may change between calls without any sign a cache could trust) into
// panels of kPanel columns, K x kPanel floats each, and a tile of up to kMaxRows rows of one
// panel (of half as many rows and two panels with AVX-512; for one or two rows, of several
// panels) accumulates in vector registers over K.
// A call of one step (streaming: LSTM.step) reads the weights where they lie instead, as dot
// products, in one thread unless the weights outgrow half a core's level-2 cache (see Weight, run).
//
// lstmkit::linear runs one large product on the same kernel, blocks of its rows shared between
// threads: training's input half x W_ih^T + b over all steps, and its gradient by x.

#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>
#include <thread>
#include <vector>

#include "cell.h"
#include "layer.h"
#include "ops.h"
#include "simd.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

namespace lstmkit {
namespace {

constexpr int64_t kPanel = 2 * kLanes;  // columns per packed panel: two vectors

// A hint to the core that this thread is spinning.
inline void pause() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

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

// A weight (n, k), packed: panel p holds columns [p kPanel, (p + 1) kPanel) of its transpose
// as k rows of kPanel floats (zeros past n), so that a tile reads it in order. A transposed
// view (of a (k, n) row-major tensor) is copied slice by slice, its rows being those panels'.
Tensor pack(const Tensor& weight) {
  const int64_t n = weight.size(0), k = weight.size(1);
  if (weight.stride(0) == 1 && weight.stride(1) == n && n > 1) {
    Tensor packed = at::empty({panels(n) * k * kPanel}, weight.options());
    const float* src = weight.const_data_ptr<float>();
    float* const out = packed.data_ptr<float>();
    at::parallel_for(0, panels(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t width = std::min(kPanel, n - p * kPanel);
        for (int64_t e = 0; e < k; ++e) {
          float* row = out + (p * k + e) * kPanel;
          std::memcpy(row, src + e * n + p * kPanel, width * sizeof(float));
          std::fill(row + width, row + kPanel, 0.0f);
        }
      }
    });
    return packed;
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

// A weight as the products read it: packed, or (`plain`) its rows where they lie, one pointer
// per output column (k floats each). A call of one step takes the weights plain: packing them
// would cost more than the one product each serves (4 ms at H = 512).
struct Weight {
  Tensor packed, source;            // source: what `plain` points into, held alive
  std::vector<const float*> plain;  // empty when packed
};

// b_ih + b_hh (zero where both are undefined) at the rows unit_rows takes of each of `blocks`
// blocks of `hidden`, padded with zeros to whole panels: one allocation and one loop (the ATen
// sum, narrow and copy cost ~8 us of a 60 us one-step call).
Tensor joint_bias(const Tensor& b_ih, const Tensor& b_hh, int64_t hidden, int64_t j0, int64_t width,
                  int64_t blocks) {
  Tensor out = at::zeros({panels(blocks * width) * kPanel}, at::kFloat);
  if (b_ih.defined()) {
    const float *a = b_ih.const_data_ptr<float>(), *b = b_hh.const_data_ptr<float>();
    float* const o = out.data_ptr<float>();
    for (int64_t g = 0; g < blocks; ++g) {
      for (int64_t j = 0; j < width; ++j) {
        o[g * width + j] = a[g * hidden + j0 + j] + b[g * hidden + j0 + j];
      }
    }
  }
  return out;
}

// Rows [g block + j0, g block + j0 + width) of every block of `block` rows of t, the blocks in
// order (a worker's units in each gate's block): t itself where width == block.
Tensor unit_rows(const Tensor& t, int64_t block, int64_t j0, int64_t width) {
  if (width == block) return t;
  std::vector<Tensor> parts;
  for (int64_t g = 0; g < t.size(0) / block; ++g)
    parts.push_back(t.narrow(0, g * block + j0, width));
  return at::cat(parts);
}

// unit_rows of a weight (n, k), packed, or plain.
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

// One operand of a product: rows of A by row pointers (each k floats) and a weight, packed or
// (`plain`, `columns` of them) as row pointers.
struct Operand {
  const float* const* rows;
  const float* packed;
  int64_t k;
  const float* const* plain = nullptr;
  int64_t columns = 0;
};

Operand operand(const float* const* rows, const Weight& weight, int64_t k) {
  return {rows, pointer<float>(weight.packed), k,
          weight.plain.empty() ? nullptr : weight.plain.data(),
          static_cast<int64_t>(weight.plain.size())};
}

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

// out[r][columns of panels p .. p + kPanels) for kRows rows, r0 on: `init` (a bias padded to
// whole panels, or null for zero; or, with `accumulate`, out itself) plus A[r][k0, k1) times
// the weight's rows k0 .. k1. The weight's vectors are forced into registers (the empty asm):
// GCC would otherwise fold each load into every row's multiply-add and run out of loads.
template <int kRows, int kPanels>
void tile(const Operand& op, int64_t k0, int64_t k1, int64_t p, int64_t r0, const float* init,
          bool accumulate, float* const* out) {
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
  for (int64_t e = k0; e < k1; ++e, b += kPanel) {
#pragma GCC unroll 4
    for (int q = 0; q < kPanels; ++q) {
      Vec w0 = load(b + q * op.k * kPanel), w1 = load(b + q * op.k * kPanel + kLanes);
      asm("" : "+x"(w0), "+x"(w1));
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
              const float* init, bool accumulate, float* const* out) {
  if constexpr (kRows > 1) {
    if (rows < kRows)
      return row_tile<kRows - 1, kPanels>(rows, op, k0, k1, p, r0, init, accumulate, out);
  }
  tile<kRows, kPanels>(op, k0, k1, p, r0, init, accumulate, out);
}

// Row tiles of kPanels panels, from panel p while kPanels of them remain, each of at most
// kMaxRows / kPanels of the n rows (so as many sums in flight), their heights as even as they
// go (8 = 4 + 4); the first panel left.
template <int kPanels>
int64_t row_tiles(const Operand& op, int64_t k0, int64_t k1, int64_t p, int64_t n,
                  int64_t count_panels, const float* init, bool accumulate, float* const* out) {
  constexpr int kRows = kMaxRows / kPanels;
  const int64_t tiles = (n + kRows - 1) / kRows;
  for (; p + kPanels <= count_panels; p += kPanels) {
    for (int64_t t = 0, r = 0; t < tiles; ++t) {
      const int rows = static_cast<int>((n - r) / (tiles - t));
      row_tile<kRows, kPanels>(rows, op, k0, k1, p, r, init, accumulate, out);
      r += rows;
    }
  }
  return p;
}

// A route that the environment variable `variable` forces (the tests run every one), or "".
std::string_view forced(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr ? value : "";
}

// Panels per row tile where a product has more than two rows: two with AVX-512's 32 registers
// (6 rows x 4 vectors, a weight vector feeding 6 sums and a broadcast 4, against 12 x 2: 2
// weight loads and 12 broadcasts for 24 multiply-adds). Measured on an Intel Xeon (family 6,
// model 167), inference time / nn.LSTM's with one panel and with two: L 1.20 -> 1.01 at 2
// threads and 1.14 -> 1.03 at 1, M 1.07 -> 0.99, D2 1.14 -> 1.04, S 0.54 -> 0.49. One with 16
// registers (6 rows x 2 vectors, the tile tuned on a Zen 3; two panels there, 3 rows x 4,
// are not measured).
// LSTMKIT_NATIVE_TILE=1 or =2 forces either (tests).
int tile_panels() {
  const std::string_view choice = forced("LSTMKIT_NATIVE_TILE");
  if (choice == "1") return 1;
  if (choice == "2") return 2;
  return kMaxRows == 12 ? 2 : 1;
}

// out rows (n of them, each padded to whole panels, `count_panels` of them) = bias (or zero;
// or, `onto_out`, out itself) + the sum of the operands' products, kDepth of an operand's K at a
// time. One or two rows take several panels per tile, so that enough independent sums are in
// flight; more rows take `panels_per_tile` (tile_panels) panels per tile, then one.
void product(const Operand* ops, int count, int64_t n, int64_t count_panels, const float* bias,
             float* const* out, int panels_per_tile, bool onto_out = false) {
  bool accumulate = onto_out;
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
      } else if (panels_per_tile == 2) {
        p = row_tiles<2>(op, k0, k1, p, n, count_panels, bias, accumulate, out);
      }
      row_tiles<1>(op, k0, k1, p, n, count_panels, bias, accumulate, out);
    }
  }
}

// z (n values) = gain LN(v) + shift + add, or (add null) z += gain LN(v) + shift, LN over n,
// with LN(v) into `hat`. Returns 1 / std of v and, where `mean` is given, stores its mean.
float layer_norm_into(float* z, const float* v, float* hat, const float* gain, const float* shift,
                      const float* add, int64_t n, float* mean = nullptr) {
  const float rstd = normalise(v, hat, n, mean);
  if (add != nullptr) {
    for (int64_t j = 0; j < n; ++j) z[j] = gain[j] * hat[j] + shift[j] + add[j];
  } else {
    for (int64_t j = 0; j < n; ++j) z[j] += gain[j] * hat[j] + shift[j];
  }
  return rstd;
}

// new_ = p old + (1 - p) new_, n values: zoneout's expectation.
void zone(float* new_, const float* old, float p, int64_t n) {
  for (int64_t j = 0; j < n; ++j) new_[j] = p * old[j] + (1.0f - p) * new_[j];
}

Tensor contiguous(const std::optional<Tensor>& t) {
  return t.has_value() ? t->contiguous() : Tensor();
}

// How a layer's work is shared between threads (see the top of the file).
enum class Split { kRows, kUnits };

constexpr int64_t kMinUnits = 16;        // hidden units per worker, at least, when split by units
constexpr int64_t kRowsPerThread = 4;    // rows per thread, at least, when split by rows
constexpr int64_t kAheadValues = 65536;  // of a worker's input half computed ahead (256 KB)
// Rows of a worker up to which layernorm's input half is computed ahead too (the other cells':
// below kMaxRows): its layer norm is one more pass over the ahead rows, which pays only for the
// shortest tiles. Measured on an AMD EPYC Zen 4, layernorm time ahead / step by step: one row (B =
// 1 at T = 200 and B = 2 at 2 threads, H = 128) inference 0.81-0.87, training 0.92-0.96; two rows
// 0.95-0.99 and 0.96-1.00; four 0.95-1.04 and 1.00-1.12; eight (S at 1 thread) 1.03 and 1.04.
constexpr int64_t kLayerNormAheadRows = 2;

// A core's level-2 cache in bytes, as the C library reports it (512 KB where it does not).
int64_t level2_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t{512} << 10;
  }();
  return bytes;
}

// Weights larger than this many level-2 caches are split by units where units can run.
constexpr int64_t kUnitsWeightsL2 = 4;

// Hidden units from which a layer is split by units whatever its batch (where units can run).
constexpr int64_t kUnitsHidden = 128;

// For the cells whose gates of a unit need nothing but that unit's values (no layer norm over
// the row, no projection of the whole of it), units when the batch is too small to give each
// thread several rows, when the weights (W_ih and W_hh) are `large`, many times a core's
// level-2 cache, or when there are kUnitsHidden units or more; else rows. Split by rows, every
// thread streams all of the weights at every step; split by units, half as much each at two
// threads and every row in each tile, for one wait per step. Measured, inference at 2 threads,
// time by units / time by rows: on a Zen 3 (512 KB L2), H = 384 to 1024 and B = 16 to 256
// 0.85-1.0, L 0.82-0.84, H = 256 (2 MB of weights) the same either way; on an Intel Xeon
// (family 6 model 167, 2 MB L2), H = I = 128 to 640 at B = 16 to 256 0.85-0.96 (M 0.87-0.89,
// L 0.63-0.91), H = 64 at B = 16 and 64 1.08-1.14. H = 128 to 256 on a Zen 3 is not measured.
// LSTMKIT_NATIVE_SPLIT=rows or =units forces one where it can run (tests).
Split choose_split(Kind kind, bool projected, int64_t batch, int64_t hidden, bool large,
                   int64_t threads) {
  const bool units_run =
      kind != Kind::kLayerNorm && !projected && threads > 1 && hidden >= 2 * kMinUnits;
  const std::string_view choice = forced("LSTMKIT_NATIVE_SPLIT");
  if (choice == "units" && units_run) return Split::kUnits;
  if (choice == "rows") return Split::kRows;
  const bool few_rows = batch < kRowsPerThread * threads;
  return units_run && (few_rows || large || hidden >= kUnitsHidden) ? Split::kUnits : Split::kRows;
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

// Pauses a waiting worker spins before it yields its core at every further check. Few: a
// server's client threads each run a parallel region, so a worker's partner may be waiting for
// a core this one holds. Measured on an AMD EPYC Zen 4 (2 cores), four client threads sharing
// a model (H = 256, B 1-64, T 10-200, split by units), requests a second 128 pauses 41.5-42.7
// against 4096 27.4-34.7 (nn.LSTM 44); one caller, time at 128 / at 4096: B = 1, T = 200, H = 128
// 1.02, (32, 100, 256) 0.99, (8, 50, 128) 1.00 (no pauses at all: 1.12, 1.02, 1.04).
constexpr int kSpinsBeforeYield = 128;

// The steps one worker has finished, on a cache line of its own; the others wait for it.
struct alignas(64) Progress {
  std::atomic<int64_t> done{0};

  void wait_for(int64_t steps) const {
    for (int spins = 0; done.load(std::memory_order_acquire) < steps; ++spins) {
      if (spins < kSpinsBeforeYield) {
        pause();
      } else {
        std::this_thread::yield();  // more threads than cores: let the awaited one run
      }
    }
  }
};

// One worker's share of a layer and its scratch: rows (increasing) and the hidden units
// [j0, j0 + width) of each, with the weights' rows of those units.
struct Worker {
  std::vector<int64_t> rows;
  int64_t j0 = 0, width = 0;
  Weight ih, hh;          // W_ih, W_hh: the rows of its gates
  Tensor bias, peephole;  // their bias; p_i, p_f, p_o
  Cell<float> cell{};     // its units' cell: `width` units, peephole from `peephole`
  std::vector<float> z, extra, hat, m, h_new;
  std::vector<const float*> xr, hr, mr;
  // Few rows (short tiles): the input half of `block` steps at once, into `ahead` (rows `ab`,
  // from the inputs `xb`; layernorm: each row normalised there), each step's z then being its
  // block row; 0: every step its own.
  int64_t block = 0;
  std::vector<float> ahead;
  std::vector<const float*> xb;
  std::vector<float*> ab;
  std::vector<float*> zr, er, mw, hw;  // mw: the same rows as mr, written
};

// The layer forward of inference and training_forward, on x (T, B, I); `keep` (training) also
// returns every step's activated gates and c_t for the backward, and for layernorm what its
// layer norms' backward reads (see training_forward in ops.h), split by rows (by units, the
// training step at L took 898-902 ms against 836-847: the input half and the kept gates go in
// per-gate pieces, and with W_hh alone to stream the halved traffic does not pay for the wait).
TrainingForward run(
    const Tensor& x, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& peephole,
    const std::optional<Tensor>& ln_ih_weight, const std::optional<Tensor>& ln_ih_bias,
    const std::optional<Tensor>& ln_hh_weight, const std::optional<Tensor>& ln_hh_bias,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias, Kind kind,
    double zone_h_p, double zone_c_p, at::IntArrayRef batch_sizes, bool keep) {
  const int64_t steps = x.size(0), batch = x.size(1), in = x.size(2);
  const int64_t hidden = c0_in.size(-1), proj = w_hh.size(1);
  const int64_t gates = (kind == Kind::kCifg ? 3 : 4) * hidden;
  const bool layernorm = kind == Kind::kLayerNorm, projected = w_hr.has_value();
  const std::vector<int64_t> sizes = running(batch_sizes, steps, batch);
  const Tensor xs = x.stride(2) == 1 ? x : x.contiguous();
  const Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const auto options = x.options();

  // Parameters at this call: packed weights (plain for one step), the two biases as one,
  // padded to whole panels.
  const bool plain = steps == 1;
  const int tiling = tile_panels();
  const Tensor bias_ih = contiguous(b_ih), bias_hh = contiguous(b_hh);
  const Tensor ch = contiguous(peephole), ln_ih_w = contiguous(ln_ih_weight);
  const Tensor ln_ih_b = contiguous(ln_ih_bias), ln_hh_w = contiguous(ln_hh_weight);
  const Tensor ln_hh_b = contiguous(ln_hh_bias), ln_c_w = contiguous(ln_c_weight);
  const Tensor ln_c_b = contiguous(ln_c_bias);
  const Weight weight_hr = projected ? prepare(*w_hr, proj, 0, proj, plain) : Weight();

  const bool ragged = !batch_sizes.empty();
  Tensor output =
      ragged ? at::zeros({steps, batch, proj}, options) : at::empty({steps, batch, proj}, options);
  // c_t in slot t % 2; or, kept for the backward, every c_t and every step's activated gates
  const auto buffer = [&](at::IntArrayRef shape) {
    return ragged ? at::zeros(shape, options) : at::empty(shape, options);
  };
  Tensor cells = keep ? buffer({steps, batch, hidden}) : at::empty({2, batch, hidden}, options);
  // what training keeps (see training_forward): empty tensors where it keeps nothing, nothing in
  // inference (an allocation costs as much as a tenth of a one-step call's gate pass)
  const auto kept = [&](bool wanted, at::IntArrayRef shape) {
    return wanted ? buffer(shape) : keep ? at::empty({0}, options) : Tensor();
  };
  Tensor kept_gates = kept(keep, {steps, batch, gates});
  // layernorm in training: LN_hh's and LN_c's normalised inputs and their 1 / std (as
  // lstmkit::recurrence keeps them), and x W_ih^T with its mean and 1 / std
  const bool kept_ln = keep && layernorm;
  Tensor hhat = kept(kept_ln, {steps, batch, gates}), chat = kept(kept_ln, {steps, batch, hidden});
  Tensor rstd = kept(kept_ln, {steps, batch, 2});
  Tensor products_ih = kept(kept_ln, {steps, batch, gates});
  Tensor stats_ih = kept(kept_ln, {2, steps, batch, 1});
  float* const hhat_p = kept_ln ? hhat.data_ptr<float>() : nullptr;
  float* const chat_p = kept_ln ? chat.data_ptr<float>() : nullptr;
  float* const rstd_p = kept_ln ? rstd.data_ptr<float>() : nullptr;
  float* const products_ih_p = kept_ln ? products_ih.data_ptr<float>() : nullptr;
  float* const stats_ih_p = kept_ln ? stats_ih.data_ptr<float>() : nullptr;
  const auto slot = [keep](int64_t t) { return keep ? t : t % 2; };
  float* const gates_p = keep ? kept_gates.data_ptr<float>() : nullptr;
  float* const out_p = output.data_ptr<float>();
  float* const cells_p = cells.data_ptr<float>();
  const float* const x_p = xs.const_data_ptr<float>();
  const float* const h0_p = h0.const_data_ptr<float>();
  const float* const c0_p = c0.const_data_ptr<float>();
  const float zh = static_cast<float>(zone_h_p), zc = static_cast<float>(zone_c_p);
  const int64_t sx0 = xs.stride(0), sx1 = xs.stride(1);
  const int64_t hr_panels = panels(proj);
  const int64_t blocks = gates / hidden;

  // Who computes what: every worker the rows of its share of the batch with all the weights,
  // or (split by units) every row with its share of the hidden units and of the weights' rows.
  const int64_t weight_bytes = gates * (in + proj) * static_cast<int64_t>(sizeof(float));
  const bool large = weight_bytes > kUnitsWeightsL2 * level2_bytes();
  // One step on weights under half a core's level-2 cache: one thread, waking the others costs
  // more. Larger, they come from the shared cache or memory, about 10 GB/s a core (another
  // layer's weights, or anything else, evicted them since the last step), and every thread
  // streams its share. Measured on the Intel Xeon (2 MB L2), LSTM.step of two layers at 2
  // threads, in one thread and in two: H = 128 (512 KB a layer) 224-230 and 235-242 us, H = 192
  // (1.2 MB) 426-461 and 294-329, H = 256 (2 MB) 695-724 and 420-440, H = 512 (8 MB) 2700 and
  // 1090-1250 (ONNX Runtime 1056).
  const int64_t threads = plain && 2 * weight_bytes <= level2_bytes() ? 1 : at::get_num_threads();
  const Split split =
      keep ? Split::kRows : choose_split(kind, projected, batch, hidden, large, threads);
  const int64_t wanted =
      split == Split::kUnits ? std::min(threads, hidden / kMinUnits) : std::min(threads, batch);
  const int64_t share = (hidden + wanted - 1) / wanted;  // units per worker (split by units)
  const int64_t unit_share = (share + kLanes - 1) / kLanes * kLanes;
  // shares rounded up to whole vectors can leave the last workers no units (H = 64 in shares of
  // 32 at three threads, with 16 lanes): those do not run
  const int64_t workers = split == Split::kUnits ? (hidden + unit_share - 1) / unit_share : wanted;
  // The weights, for one worker (split by units) or for all.
  const auto packed = [&](int64_t j0, int64_t width) {
    const Tensor padded = joint_bias(bias_ih, bias_hh, hidden, j0, width, blocks);
    Weight ih = prepare(w_ih, hidden, j0, width, plain);
    return std::make_tuple(std::move(ih), prepare(w_hh, hidden, j0, width, plain), padded,
                           ch.defined() ? unit_rows(ch, hidden, j0, width).contiguous() : Tensor());
  };
  const auto shared =
      split == Split::kRows ? packed(0, hidden) : std::tuple<Weight, Weight, Tensor, Tensor>();
  std::vector<Progress> progress(workers);  // split by units: the steps each worker has done

  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<Worker> mine;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t j0 = split == Split::kUnits ? std::min(hidden, w * unit_share) : 0;
      const int64_t width = split == Split::kUnits ? std::min(unit_share, hidden - j0) : hidden;
      auto [ih, hh, b, peep] = split == Split::kUnits ? packed(j0, width) : shared;
      Worker& worker = mine.emplace_back();
      worker.rows = split == Split::kUnits ? rows_of_worker(0, 1, batch)  // every row
                                           : rows_of_worker(w, workers, batch);
      worker.j0 = j0;
      worker.width = width;
      worker.ih = std::move(ih);
      worker.hh = std::move(hh);
      worker.bias = std::move(b);
      worker.peephole = std::move(peep);
      worker.cell = {kind,
                     width,
                     pointer<float>(worker.peephole),
                     pointer<float>(ln_hh_w),
                     pointer<float>(ln_hh_b),
                     pointer<float>(ln_c_w),
                     pointer<float>(ln_c_b)};
      const int64_t count = static_cast<int64_t>(worker.rows.size()), padded = worker.bias.size(0);
      worker.z.resize(count * padded);
      worker.extra.resize(layernorm ? count * padded : 0);
      worker.hat.resize(std::max(padded, hidden));
      worker.m.resize(projected ? count * hidden : 0);
      worker.h_new.resize(projected ? count * hr_panels * kPanel : 0);
      worker.xr.resize(count);
      worker.hr.resize(count);
      worker.zr.resize(count);
      worker.er.resize(count);
      worker.mr.resize(count);
      worker.mw.resize(count);
      worker.hw.resize(count);
      if (count < (layernorm ? kLayerNormAheadRows + 1 : kMaxRows)) {
        worker.block =
            std::clamp<int64_t>(kAheadValues / (count * padded), 1, std::min<int64_t>(64, steps));
        worker.ahead.resize(worker.block * count * padded);
        worker.xb.resize(worker.block * count);
        worker.ab.resize(worker.block * count);
        for (int64_t i = 0; i < worker.block * count; ++i) {
          worker.ab[i] = worker.ahead.data() + i * padded;
        }
      }
      for (int64_t r = 0; r < count; ++r) {
        worker.zr[r] = worker.z.data() + r * padded;
        if (layernorm) worker.er[r] = worker.extra.data() + r * padded;
        if (projected) {
          worker.mw[r] = worker.m.data() + r * hidden;
          worker.mr[r] = worker.mw[r];
          worker.hw[r] = worker.h_new.data() + r * hr_panels * kPanel;
        }
      }
    }
    for (int64_t t = 0; t < steps; ++t) {
      if (sizes[t] == 0) break;
      for (int64_t k = 0; k < static_cast<int64_t>(mine.size()); ++k) {
        Worker& worker = mine[k];
        const int64_t count = static_cast<int64_t>(worker.rows.size());
        const int64_t n = running_prefix(worker.rows, sizes[t]);
        if (n == 0) continue;
        const int64_t j0 = worker.j0, width = worker.width;
        const int64_t columns = panels(blocks * width);
        const float* const bias_p = worker.bias.const_data_ptr<float>();
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = worker.rows[r];
          worker.xr[r] = x_p + t * sx0 + b * sx1;
          worker.hr[r] = t == 0 ? h0_p + b * proj : out_p + ((t - 1) * batch + b) * proj;
        }
        const Operand input = operand(worker.xr.data(), worker.ih, in);
        const Operand recurrent = operand(worker.hr.data(), worker.hh, proj);
        float* const hat = worker.hat.data();
        const int64_t ahead_at = worker.block > 0 ? t % worker.block : 0;
        float* const* const z =
            worker.block > 0 ? worker.ab.data() + ahead_at * count : worker.zr.data();
        // layernorm: z = LN(v; g_ih, b_ih) + b, v = x W_ih^T of step `step` and row b (z and v
        // may be one row); then z += LN(h_{t-1} W_hh^T; g_hh, b_hh) for the running rows
        const auto input_norm = [&](float* z_row, const float* v, int64_t step, int64_t b) {
          const int64_t at = step * batch + b;
          if (kept_ln) std::memcpy(products_ih_p + at * gates, v, gates * sizeof(float));
          const float sd =
              layer_norm_into(z_row, v, hat, pointer<float>(ln_ih_w), pointer<float>(ln_ih_b),
                              bias_p, gates, kept_ln ? stats_ih_p + at : nullptr);
          if (kept_ln) stats_ih_p[steps * batch + at] = sd;
        };
        const auto recurrent_norm = [&](float* const* z_rows) {
          product(&recurrent, 1, n, columns, nullptr, worker.er.data(), tiling);
          for (int64_t r = 0; r < n; ++r) {
            const int64_t at = t * batch + worker.rows[r];
            const float sd =
                layer_norm_into(z_rows[r], worker.er[r], kept_ln ? hhat_p + at * gates : hat,
                                pointer<float>(ln_hh_w), pointer<float>(ln_hh_b), nullptr, gates);
            if (kept_ln) rstd_p[2 * at] = sd;
          }
        };
        if (worker.block > 0) {  // z = (its block's input half) + the recurrent half
          if (ahead_at == 0) {
            const int64_t span = std::min(worker.block, steps - t);
            for (int64_t q = 0; q < span; ++q) {
              for (int64_t r = 0; r < count; ++r) {
                worker.xb[q * count + r] = x_p + (t + q) * sx0 + worker.rows[r] * sx1;
              }
            }
            const Operand inputs = operand(worker.xb.data(), worker.ih, in);
            product(&inputs, 1, span * count, columns, layernorm ? nullptr : bias_p,
                    worker.ab.data(), tiling);
            for (int64_t q = 0; layernorm && q < span; ++q) {
              const int64_t running_q = running_prefix(worker.rows, sizes[t + q]);
              for (int64_t r = 0; r < running_q; ++r) {
                float* const row = worker.ab[q * count + r];
                input_norm(row, row, t + q, worker.rows[r]);
              }
            }
          }
          if (layernorm) {
            recurrent_norm(z);
          } else {
            product(&recurrent, 1, n, columns, nullptr, z, tiling, true);
          }
        } else if (layernorm) {
          product(&input, 1, n, columns, nullptr, worker.er.data(), tiling);
          for (int64_t r = 0; r < n; ++r) input_norm(worker.zr[r], worker.er[r], t, worker.rows[r]);
          recurrent_norm(worker.zr.data());
        } else {
          const Operand both[2] = {input, recurrent};
          product(both, 2, n, columns, bias_p, worker.zr.data(), tiling);
        }
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = worker.rows[r];
          const float* c_prev =
              (t == 0 ? c0_p + b * hidden : cells_p + (slot(t - 1) * batch + b) * hidden) + j0;
          float* c_new = cells_p + (slot(t) * batch + b) * hidden + j0;
          float* h_out = out_p + (t * batch + b) * proj + j0;
          const int64_t at_t = t * batch + b;
          const float sd =
              gates_forward_row(worker.cell, z[r], c_prev, c_new, projected ? worker.mw[r] : h_out,
                                kept_ln ? chat_p + at_t * hidden : hat);
          if (kept_ln) rstd_p[2 * at_t + 1] = sd;
          if (zc != 0.0f) zone(c_new, c_prev, zc, width);
          if (keep) std::memcpy(gates_p + (t * batch + b) * gates, z[r], gates * sizeof(float));
        }
        if (projected) {
          const Operand projection = operand(worker.mr.data(), weight_hr, hidden);
          product(&projection, 1, n, hr_panels, nullptr, worker.hw.data(), tiling);
          for (int64_t r = 0; r < n; ++r) {
            std::memcpy(out_p + (t * batch + worker.rows[r]) * proj, worker.hw[r],
                        proj * sizeof(float));
          }
        }
        if (zh != 0.0f) {
          const int64_t zoned = projected ? proj : width;
          for (int64_t r = 0; r < n; ++r) {
            zone(out_p + (t * batch + worker.rows[r]) * proj + j0, worker.hr[r] + j0, zh, zoned);
          }
        }
        if (split == Split::kUnits)
          progress[begin + k].done.store(t + 1, std::memory_order_release);
      }
      if (split == Split::kUnits) {
        for (const Progress& other : progress) other.wait_for(t + 1);
      }
    }
  });

  // Each sequence's state after its last step (its initial state if it has none).
  Tensor h_n = at::empty({batch, proj}, options);
  Tensor c_n = at::empty({batch, hidden}, options);
  for (int64_t b = 0, last = steps; b < batch; ++b) {
    while (last > 0 && sizes[last - 1] <= b) --last;  // sequence b runs steps [0, last)
    const float* h = last == 0 ? h0_p + b * proj : out_p + ((last - 1) * batch + b) * proj;
    const float* c =
        last == 0 ? c0_p + b * hidden : cells_p + (slot(last - 1) * batch + b) * hidden;
    std::memcpy(h_n.data_ptr<float>() + b * proj, h, proj * sizeof(float));
    std::memcpy(c_n.data_ptr<float>() + b * hidden, c, hidden * sizeof(float));
  }
  return {output, h_n, c_n, kept_gates, cells, hhat, chat, rstd, products_ih, stats_ih};
}

// The arguments of a layer's operator from its input (inference, training_forward), checked:
// `op` names it in the messages.
void check_layer(const char* op, const Tensor& x, const Tensor& h0_in, const Tensor& c0_in,
                 const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                 const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
                 const std::optional<Tensor>& peephole, const std::optional<Tensor>& ln_ih_weight,
                 const std::optional<Tensor>& ln_ih_bias, const std::optional<Tensor>& ln_hh_weight,
                 const std::optional<Tensor>& ln_hh_bias, const std::optional<Tensor>& ln_c_weight,
                 const std::optional<Tensor>& ln_c_bias, c10::string_view kind_name, Kind kind) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3, op,
              " takes a float32 CPU input (T, B, I), got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  const int64_t batch = x.size(1), in = x.size(2);
  const int64_t hidden = c0_in.size(-1), proj = w_hh.size(1);
  const int64_t gates = (kind == Kind::kCifg ? 3 : 4) * hidden;
  const bool layernorm = kind == Kind::kLayerNorm, projected = w_hr.has_value();
  const auto check = [&](const std::optional<Tensor>& t, bool wanted, at::IntArrayRef shape,
                         const char* name) {
    TORCH_CHECK(t.has_value() == wanted, op, ": kind ", kind_name,
                wanted ? " needs " : " takes no ", name);
    if (wanted) {
      TORCH_CHECK(t->sizes() == shape && t->scalar_type() == at::kFloat, op, ": ", name,
                  " must be float32 ", shape, ", got ", t->scalar_type(), " ", t->sizes());
    }
  };
  check(h0_in, true, {batch, proj}, "h0");
  check(c0_in, true, {batch, hidden}, "c0");
  check(w_ih, true, {gates, in}, "weight_ih");
  check(w_hh, true, {gates, proj}, "weight_hh");
  check(b_ih, b_ih.has_value(), {gates}, "bias_ih");
  check(b_hh, b_ih.has_value(), {gates}, "bias_hh");
  check(w_hr, projected, {proj, hidden}, "weight_hr");
  TORCH_CHECK(projected || proj == hidden, op, ": without weight_hr, h0 must be (B, H)");
  check(peephole, kind == Kind::kPeephole, {3 * hidden}, "weight_ch");
  check(ln_ih_weight, layernorm, {gates}, "ln_ih_weight");
  check(ln_ih_bias, layernorm, {gates}, "ln_ih_bias");
  check(ln_hh_weight, layernorm, {gates}, "ln_hh_weight");
  check(ln_hh_bias, layernorm, {gates}, "ln_hh_bias");
  check(ln_c_weight, layernorm, {hidden}, "ln_c_weight");
  check(ln_c_bias, layernorm, {hidden}, "ln_c_bias");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> inference(
    const Tensor& x, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& peephole,
    const std::optional<Tensor>& ln_ih_weight, const std::optional<Tensor>& ln_ih_bias,
    const std::optional<Tensor>& ln_hh_weight, const std::optional<Tensor>& ln_hh_bias,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
    c10::string_view kind_name, double zone_h_p, double zone_c_p, at::IntArrayRef batch_sizes) {
  const Kind kind = parse_kind(std::string_view(kind_name.data(), kind_name.size()));
  check_layer("lstmkit::inference", x, h0_in, c0_in, w_ih, w_hh, b_ih, b_hh, w_hr, peephole,
              ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias, kind_name,
              kind);
  TORCH_CHECK(0 <= zone_h_p && zone_h_p < 1 && 0 <= zone_c_p && zone_c_p < 1,
              "lstmkit::inference: zoneout probabilities must be in [0, 1), got ", zone_h_p,
              " and ", zone_c_p);
  const TrainingForward out = run(x, h0_in, c0_in, w_ih, w_hh, b_ih, b_hh, w_hr, peephole,
                                  ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_c_weight,
                                  ln_c_bias, kind, zone_h_p, zone_c_p, batch_sizes, false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

std::tuple<Tensor, Tensor, Tensor> inference_stack(const Tensor& x, const Tensor& h0,
                                                   const Tensor& c0,
                                                   const c10::List<std::optional<Tensor>>& params,
                                                   c10::string_view kind_name, double zone_h_p,
                                                   double zone_c_p) {
  constexpr int64_t kPerLayer = 12;  // inference's parameters, weight_ih to ln_c_bias
  const int64_t layers = static_cast<int64_t>(params.size()) / kPerLayer;
  TORCH_CHECK(h0.dim() == 3 && c0.dim() == 3 && h0.size(0) == c0.size(0) && layers >= 1 &&
                  static_cast<int64_t>(params.size()) == layers * kPerLayer && h0.size(0) == layers,
              "lstmkit::inference_stack takes h0 (L, B, P), c0 (L, B, H) and 12 parameters a "
              "layer, got h0 ",
              h0.sizes(), ", c0 ", c0.sizes(), " and ", params.size(), " parameters");
  TORCH_CHECK(h0.scalar_type() == at::kFloat && c0.scalar_type() == at::kFloat,
              "lstmkit::inference_stack takes float32 states, got ", h0.scalar_type(), " and ",
              c0.scalar_type());
  // Each layer's states as views made without the dispatcher (a select costs ~1 us, as much
  // as a fifth of a small layer's step), its final ones copied into the stacked outputs.
  const Tensor h_in = h0.contiguous(), c_in = c0.contiguous();
  Tensor h_n = at::empty(h_in.sizes(), h_in.options());
  Tensor c_n = at::empty(c_in.sizes(), c_in.options());
  const auto layer_of = [](const Tensor& states, int64_t layer) {
    const int64_t size = states.size(1) * states.size(2);
    return at::from_blob(const_cast<float*>(states.const_data_ptr<float>()) + layer * size,
                         {states.size(1), states.size(2)}, states.options());
  };
  const auto copy_into = [](Tensor& states, int64_t layer, const Tensor& final) {
    std::memcpy(states.data_ptr<float>() + layer * final.numel(), final.const_data_ptr<float>(),
                final.numel() * sizeof(float));
  };
  Tensor input = x;
  for (int64_t layer = 0; layer < layers; ++layer) {
    const auto param = [&](int64_t i) { return params.get(layer * kPerLayer + i); };
    const std::optional<Tensor> w_ih = param(0), w_hh = param(1);
    TORCH_CHECK(w_ih.has_value() && w_hh.has_value(), "lstmkit::inference_stack: layer ", layer,
                " needs weight_ih and weight_hh");
    auto [output, h, c] =
        inference(input, layer_of(h_in, layer), layer_of(c_in, layer), *w_ih, *w_hh, param(2),
                  param(3), param(4), param(5), param(6), param(7), param(8), param(9), param(10),
                  param(11), kind_name, zone_h_p, zone_c_p, {});
    input = std::move(output);
    copy_into(h_n, layer, h);
    copy_into(c_n, layer, c);
  }
  return {input, h_n, c_n};
}

TrainingForward training_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& peephole,
    const std::optional<Tensor>& ln_ih_weight, const std::optional<Tensor>& ln_ih_bias,
    const std::optional<Tensor>& ln_hh_weight, const std::optional<Tensor>& ln_hh_bias,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
    c10::string_view kind_name, at::IntArrayRef batch_sizes) {
  const Kind kind = parse_kind(std::string_view(kind_name.data(), kind_name.size()));
  check_layer("lstmkit::training_forward", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole,
              ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias, kind_name,
              kind);
  return run(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, ln_ih_weight, ln_ih_bias,
             ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias, kind, 0.0, 0.0, batch_sizes, true);
}

// Rows shared between threads as in the forward, each worker walking its rows back in time on
// its own products, dL/dh_{t-1} = dz_t W_hh (layernorm: drec_t W_hh, drec_t LN_hh's backward of
// dz_t) and dL/dm = dL/dh' W_hr under a projection, into padded rows of its own; layernorm's
// gain and shift gradients of LN_c add up per worker, then in worker order.
void backward_kept(const Tensor& grad_output, Tensor& dh, Tensor& dc, const Tensor& c0,
                   const Tensor& w_hh, const Tensor& w_hr, const Tensor& peephole,
                   const LayerNormKept& ln, std::string_view kind, const Tensor& gates,
                   const Tensor& cells, at::IntArrayRef batch_sizes, Tensor& dz, Tensor& dh_seq,
                   Tensor& m_seq) {
  const int64_t steps = gates.size(0), batch = gates.size(1), rows = gates.size(2);
  const std::vector<int64_t> sizes = running(batch_sizes, steps, batch);
  const int64_t hidden = cells.size(2), proj = dh.size(1);
  const bool projected = w_hr.defined();
  const Tensor packed_hh = pack(w_hh.t());                         // dz W_hh
  const Tensor packed_hr = projected ? pack(w_hr.t()) : Tensor();  // dL/dh' W_hr
  const int64_t p_panels = panels(proj), h_panels = panels(hidden);
  const int tiling = tile_panels();
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), batch);
  const Kind kind_of = parse_kind(kind);
  const bool layernorm = kind_of == Kind::kLayerNorm;
  const Cell<float> cell{kind_of,
                         hidden,
                         pointer<float>(peephole),
                         pointer<float>(ln.hh_weight),
                         nullptr,
                         pointer<float>(ln.c_weight),
                         pointer<float>(ln.c_bias)};
  const float* const hhat_p = layernorm ? ln.hhat.const_data_ptr<float>() : nullptr;
  const float* const chat_p = layernorm ? ln.chat.const_data_ptr<float>() : nullptr;
  const float* const rstd_p = layernorm ? ln.rstd.const_data_ptr<float>() : nullptr;
  float* const drec_p = layernorm ? ln.drec.data_ptr<float>() : nullptr;
  // each worker's share of the gain and shift gradients of LN_c and LN_hh
  std::vector<std::vector<float>> dgains(workers), dshifts(workers), dgains_hh(workers),
      dshifts_hh(workers);
  const float* const dout_p = pointer<float>(grad_output);
  const float* const gates_p = gates.const_data_ptr<float>();
  const float* const cells_p = cells.const_data_ptr<float>();
  const float* const c0_p = c0.const_data_ptr<float>();
  float* const dh_p = dh.data_ptr<float>();
  float* const dc_p = dc.data_ptr<float>();
  float* const dz_p = dz.data_ptr<float>();
  float* const dh_seq_p = projected ? dh_seq.data_ptr<float>() : nullptr;
  float* const m_seq_p = projected ? m_seq.data_ptr<float>() : nullptr;

  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const std::vector<int64_t> mine = rows_of_worker(w, workers, batch);
      const int64_t count = static_cast<int64_t>(mine.size());
      // dL/dh of each row (P, padded to whole panels), and dL/dm under a projection
      std::vector<float> d_h(count * p_panels * kPanel), d_m(count * h_panels * kPanel);
      std::vector<float> work(hidden);
      std::vector<float>& dgain = dgains[w];
      std::vector<float>& dshift = dshifts[w];
      std::vector<float>& dgain_hh = dgains_hh[w];
      std::vector<float>& dshift_hh = dshifts_hh[w];
      dgain.assign(layernorm ? hidden : 0, 0.0f);
      dshift.assign(layernorm ? hidden : 0, 0.0f);
      dgain_hh.assign(layernorm ? rows : 0, 0.0f);
      dshift_hh.assign(layernorm ? rows : 0, 0.0f);
      std::vector<float*> dh_rows(count), dm_rows(count);
      std::vector<const float*> dh_read(count), dz_read(count);
      for (int64_t r = 0; r < count; ++r) {
        dh_rows[r] = d_h.data() + r * p_panels * kPanel;
        dm_rows[r] = d_m.data() + r * h_panels * kPanel;
        dh_read[r] = dh_rows[r];
        std::memcpy(dh_rows[r], dh_p + mine[r] * proj, proj * sizeof(float));
      }
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t n = running_prefix(mine, sizes[t]);
        if (n == 0) continue;
        for (int64_t r = 0; r < n; ++r) {
          const int64_t at_t = t * batch + mine[r];
          if (dout_p != nullptr) {
            for (int64_t j = 0; j < proj; ++j) dh_rows[r][j] += dout_p[at_t * proj + j];
          }
          if (projected) std::memcpy(dh_seq_p + at_t * proj, dh_rows[r], proj * sizeof(float));
        }
        if (projected) {
          const Operand projection{dh_read.data(), packed_hr.const_data_ptr<float>(), proj};
          product(&projection, 1, n, h_panels, nullptr, dm_rows.data(), tiling);
        }
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = mine[r], at_t = t * batch + b;
          const float* c_prev = t == 0 ? c0_p + b * hidden : cells_p + (at_t - batch) * hidden;
          gates_backward_row<float>(
              cell, gates_p + at_t * rows, c_prev, cells_p + at_t * hidden,
              layernorm ? chat_p + at_t * hidden : nullptr, layernorm ? rstd_p[2 * at_t + 1] : 1.0f,
              projected ? dm_rows[r] : dh_rows[r], dc_p + b * hidden, dz_p + at_t * rows,
              projected ? m_seq_p + at_t * hidden : nullptr, dgain.data(), dshift.data(),
              work.data());
          dz_read[r] = dz_p + at_t * rows;
          if (layernorm) {  // drec = LN_hh's backward of dz (gain g_hh)
            float* dr = drec_p + at_t * rows;
            const float* dzr = dz_p + at_t * rows;
            const float* hh = hhat_p + at_t * rows;
            for (int64_t j = 0; j < rows; ++j) {
              dgain_hh[j] += dzr[j] * hh[j];
              dshift_hh[j] += dzr[j];
              dr[j] = dzr[j] * cell.ln_hh_weight[j];
            }
            normalise_backward(dr, hh, rstd_p[2 * at_t], rows);
            dz_read[r] = dr;
          }
        }
        const Operand recurrent{dz_read.data(), packed_hh.const_data_ptr<float>(), rows};
        product(&recurrent, 1, n, p_panels, nullptr, dh_rows.data(), tiling);
      }
      for (int64_t r = 0; r < count; ++r) {
        std::memcpy(dh_p + mine[r] * proj, dh_rows[r], proj * sizeof(float));
      }
    }
  });
  if (layernorm) {
    const auto add_up = [workers](const Tensor& total,
                                  const std::vector<std::vector<float>>& parts) {
      float* const out = total.data_ptr<float>();
      for (int64_t w = 0; w < workers; ++w) {
        for (size_t j = 0; j < parts[w].size(); ++j) out[j] += parts[w][j];
      }
    };
    add_up(ln.dgain_c, dgains);
    add_up(ln.dshift_c, dshifts);
    add_up(ln.dgain_hh, dgains_hh);
    add_up(ln.dshift_hh, dshifts_hh);
  }
}

// Rows of `a` per block that one thread takes at a time in linear, at most: the block's
// products keep their rows in the level-2 cache while the weight's panels stream past. Measured
// on an AMD EPYC Zen 4 (family 25 model 17) at 6400 x 512 x 2048 and 3200 x 256 x 1024 and
// their backward shapes: 24 and 48 rows the same, 96 and 192 up to 5% slower. Fewer rows give
// each thread four blocks or more, so that the threads finish together.
constexpr int64_t kLinearRows = 48;
constexpr int64_t kLinearBlocksPerThread = 4;

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
  const Tensor a = a_in.reshape({-1, k}).contiguous();
  const int64_t m = a.size(0), count_panels = panels(n), width = count_panels * kPanel;
  const Tensor packed = pack(weight);
  Tensor init = at::zeros({width}, a.options());
  if (bias.has_value()) init.narrow(0, 0, n).copy_(*bias);
  Tensor out = at::empty({m, width}, a.options());  // rows padded to whole panels
  const float* const a_p = a.const_data_ptr<float>();
  float* const out_p = out.data_ptr<float>();
  const int tiling = tile_panels();
  const int64_t least = kLinearBlocksPerThread * at::get_num_threads();
  const int64_t height = std::clamp<int64_t>((m + least - 1) / least, 1, kLinearRows);
  at::parallel_for(0, (m + height - 1) / height, 1, [&](int64_t begin, int64_t end) {
    const float* rows[kLinearRows];
    float* outs[kLinearRows];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * height, count = std::min(height, m - r0);
      for (int64_t r = 0; r < count; ++r) {
        rows[r] = a_p + (r0 + r) * k;
        outs[r] = out_p + (r0 + r) * width;
      }
      const Operand op{rows, packed.const_data_ptr<float>(), k};
      product(&op, 1, count, count_panels, init.const_data_ptr<float>(), outs, tiling);
    }
  });
  return (width == n ? out : out.narrow(1, 0, n).contiguous()).view(shape);
}

// Rows per task of layer_norm_backward_.
constexpr int64_t kNormRows = 16;

Tensor layer_norm_backward_(Tensor& grad, const Tensor& input, const Tensor& stats,
                            const Tensor& weight) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && input.scalar_type() == at::kFloat &&
                  stats.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  grad.is_contiguous() && weight.dim() == 1 && grad.dim() >= 1 &&
                  grad.size(-1) == weight.size(0) && input.sizes() == grad.sizes() &&
                  stats.numel() == 2 * (grad.numel() / std::max<int64_t>(weight.size(0), 1)),
              "lstmkit::layer_norm_backward_ takes contiguous float32 grad and input (..., G), "
              "stats (2, ...) and weight (G), got grad ",
              grad.scalar_type(), " ", grad.sizes(), ", input ", input.sizes(), ", stats ",
              stats.sizes(), " and weight ", weight.scalar_type(), " ", weight.sizes());
  const int64_t width = weight.size(0), rows = width == 0 ? 0 : grad.numel() / width;
  const Tensor x = input.contiguous(), moments = stats.contiguous(), gain = weight.contiguous();
  float* const d = grad.data_ptr<float>();
  const float* const x_p = x.const_data_ptr<float>();
  const float* const mean = moments.const_data_ptr<float>();
  const float* const rstd = mean + rows;
  const float* const w = gain.const_data_ptr<float>();
  // each thread's share of the gain's gradient, and its normalised row
  const int64_t threads = at::get_num_threads();
  std::vector<float> partial(threads * width, 0.0f), normalised(threads * width);
  at::parallel_for(0, rows, kNormRows, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    float* const dw = partial.data() + thread * width;
    float* const xhat = normalised.data() + thread * width;
    for (int64_t r = begin; r < end; ++r) {
      float* const dr = d + r * width;
      const float* const xr = x_p + r * width;
      const float m = mean[r], s = rstd[r];
      for (int64_t j = 0; j < width; ++j) {
        xhat[j] = (xr[j] - m) * s;
        dw[j] += dr[j] * xhat[j];
        dr[j] *= w[j];
      }
      normalise_backward(dr, xhat, s, width);
    }
  });
  Tensor dweight = at::zeros({width}, weight.options());
  float* const out = dweight.data_ptr<float>();
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t j = 0; j < width; ++j) out[j] += partial[t * width + j];
  }
  return dweight;
}

}  // namespace lstmkit
