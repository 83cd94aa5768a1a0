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
// Training of the same cells without masks uses the same row split: training_forward runs this
// forward and keeps every step's gates and c_t (and layer norm's normalised values); its
// backward is backward_rows.cpp's.
//
// The products run on panels.cpp's register-blocked kernel, the weights packed at every call
// (never kept: a parameter may change between calls without any sign a cache could trust). A
// call of one step (streaming: LSTM.step) reads the weights where they lie instead, as dot
// products, in one thread unless the weights outgrow half a core's level-2 cache (see run).

#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <string_view>
#include <thread>
#include <vector>

#include "cell.h"
#include "layer.h"
#include "ops.h"
#include "panels.h"
#include "pool.h"

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

namespace lstmkit {
namespace {

// A hint to the core that this thread is spinning.
inline void pause() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

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

// z (n values) = gain LN(v) + shift + base, or (base null) z += gain LN(v) + shift, LN over n,
// with LN(v) into `hat`, in one pass after the moments (z may be v). Returns 1 / std of v and,
// where `mean` is given, stores its mean.
float layer_norm_into(float* z, const float* v, float* hat, const float* gain, const float* shift,
                      const float* base, int64_t n, float* mean = nullptr) {
  const Moments s = moments(v, n);
  if (mean != nullptr) *mean = s.mean;
  const float* const plus = base != nullptr ? base : z;
  const int64_t whole = n / kLanes * kLanes;
  const Vec m = broadcast(s.mean), r = broadcast(s.rstd);
  for (int64_t j = 0; j < whole; j += kLanes) {
    const Vec normalised = mul(sub(load(v + j), m), r);
    store(hat + j, normalised);
    store(z + j, add(fma(load(gain + j), normalised, load(shift + j)), load(plus + j)));
  }
  for (int64_t j = whole; j < n; ++j) {
    hat[j] = (v[j] - s.mean) * s.rstd;
    z[j] = gain[j] * hat[j] + shift[j] + plus[j];
  }
  return s.rstd;
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
// Rows of a worker up to which layernorm's input half is computed ahead in long blocks (of up to
// kAheadValues values; the other cells': below kMaxRows), with more rows kAheadSteps steps at a
// time (inputs_ahead): its layer norm is one more pass over the ahead rows, which long blocks
// repay only for the shortest tiles. Measured on an AMD EPYC Zen 4, layernorm time ahead / step by
// step: one row (B = 1 at T = 200 and B = 2 at 2 threads, H = 128) inference 0.81-0.87, training
// 0.92-0.96; two rows 0.95-0.99 and 0.96-1.00; four 0.95-1.04 and 1.00-1.12; eight (S at 1
// thread) 1.03 and 1.04.
constexpr int64_t kLayerNormAheadRows = 2;

// Whether a worker of one row whose input half goes ahead in blocks computes the next block's
// beside each step's recurrent product (panels.h's product_beside) rather than all of it at the
// block's first step, its packed weights (W_ih and W_hh) being `weights_bytes`: where they stay
// in the level-2 cache (the row's product waits on it, and the side's tiles fill the wait), with
// AVX-512. Measured on an AMD EPYC Zen 4 (1 MB level-2), B = 1, inference time beside / at the
// block's start, 1 thread: H = I = 64 0.94, 128 (T1, 512 KB) 0.91-0.93, 192 (1.15 MB) 0.96,
// 256 (2 MB) 1.01, 32 1.01; 2 threads (each half the units): 128 0.95, 256 0.94. With AVX2
// (16 registers, smaller tiles beside) not measured, so not chosen. LSTMKIT_NATIVE_AHEAD=beside
// or =block forces either (tests).
bool ahead_beside(int64_t weights_bytes) {
  const std::string_view choice = forced("LSTMKIT_NATIVE_AHEAD");
  if (choice == "beside") return true;
  if (choice == "block") return false;
  return kLanes == 16 && 2 * weights_bytes <= 3 * level2_bytes();
}

// Steps whose input half a worker of many rows computes at once, where inputs_ahead says so.
constexpr int64_t kAheadSteps = 4;

// Whether a worker of many rows (kMaxRows or more; layernorm: more than kLayerNormAheadRows)
// computes its input half ahead, kAheadSteps steps at once, rather than at each step with the
// recurrent half, its packed weights being `both_bytes` (W_ih and W_hh) and `recurrent_bytes`
// (W_hh): where both fill the level-2 cache and W_hh alone fits in three quarters of it. Each
// step's product reading both evicts them from the cache, it being read in a cycle; W_ih once every
// kAheadSteps steps leaves W_hh there between steps. Measured on an Intel Xeon (family 6 model 167,
// 2 MB level-2), inference time ahead in blocks of 4 / at each step, in one process, alternated: 1
// thread, H = I = 256 (2 MB, W_hh 1 MB) B = 16 0.90, 32 (M) 0.93-0.94, 64 0.97, two layers (D2)
// 0.91-0.93; H = 384 at 2 threads (split by units, 2.4 MB a worker) 0.92. Beside those: H = 384 at
// 1 thread (W_hh 2.4 MB) 0.99, L 0.98, L at 2 threads (W_hh 2 MB a worker) 0.98-1.02, H = 256 at 2
// threads (1 MB a worker) 0.97-1.06, H = 128 and 192 (1.2 MB) 0.99-1.04. Training's forward takes
// the same rule (split by rows): training step ahead / each step, M 1.00 at 1 thread and 0.96-0.98
// at 2, D2 0.97 and 0.95. Layer norm always: its steps run two products anyway (each normalised on
// its own), and the input's, ahead, reads W_ih once for four steps' rows. On the same Xeon,
// layernorm ahead / each step: inference at 1 thread M 0.90, D2 0.92, L 0.95, S 0.97, B = 8 H = 256
// 0.79; at 2 threads M 0.88, D2 0.88, L 0.93, H = 384 0.92; training at 1 thread M 0.97, D2 0.97, L
// 0.99, S 0.93-0.96, B = 4 H = 128 1.02; at 2 threads M 0.96, D2 0.95, L 0.99, S 0.93.
// LSTMKIT_NATIVE_INPUT=ahead or =each-step forces either (tests).
bool inputs_ahead(int64_t both_bytes, int64_t recurrent_bytes, bool layernorm) {
  const std::string_view choice = forced("LSTMKIT_NATIVE_INPUT");
  if (choice == "ahead") return true;
  if (choice == "each-step") return false;
  return layernorm || (both_bytes >= level2_bytes() && 4 * recurrent_bytes <= 3 * level2_bytes());
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
  // block row; 0: every step its own. The block now running: steps [start, start + span).
  int64_t block = 0, start = 0, span = 0;
  std::vector<float> ahead;
  std::vector<const float*> xb;
  std::vector<float*> ab;
  // One row (ahead_beside): the next block's input half, computed beside this block's steps'
  // recurrent products into `next` (rows `an`, from `xn`), then swapped with `ahead`'s. Blocks
  // of 1, 2, 4, ... steps up to `block`: a block's steps have room beside them for the tiles of
  // one twice as long, and the first, computed on its own, is one step.
  bool beside = false;
  std::vector<float> next;
  std::vector<const float*> xn;
  std::vector<float*> an;
  Side side{};

  // The length of the block after one of `span` steps (from none: the first).
  int64_t after(int64_t span_now) const {
    return beside ? std::min(block, std::max<int64_t>(1, 2 * span_now)) : block;
  }
  std::vector<float*> zr, er, mw, hw;  // mw: the same rows as mr, written
};

// The layer forward of inference and training_forward, on x (T, B, I); `keep` (training) also
// returns every step's activated gates and c_t for the backward, and for layernorm what its
// layer norms' backward reads (see training_forward in ops.h), split by rows (by units, the
// training step at L took 898-902 ms against 836-847: the input half and the kept gates go in
// per-gate pieces, and with W_hh alone to stream the halved traffic does not pay for the wait).
// Inference of whole sequences may also run the steps from the last (`reverse`: a
// bidirectional layer's second direction), write its output into `into` (a (T, B, P) view of
// both directions' output), and use at most `most_threads` threads (0: torch's count).
TrainingForward run(
    const Tensor& x, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& peephole,
    const std::optional<Tensor>& ln_ih_weight, const std::optional<Tensor>& ln_ih_bias,
    const std::optional<Tensor>& ln_hh_weight, const std::optional<Tensor>& ln_hh_bias,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias, Kind kind,
    double zone_h_p, double zone_c_p, at::IntArrayRef batch_sizes, bool keep, bool reverse = false,
    const Tensor& into = Tensor(), int64_t most_threads = 0) {
  const int64_t steps = x.size(0), batch = x.size(1), in = x.size(2);
  const int64_t hidden = c0_in.size(-1), proj = w_hh.size(1);
  const int64_t gates = gate_blocks(kind) * hidden;
  const bool layernorm = kind == Kind::kLayerNorm, projected = w_hr.has_value();
  const std::vector<int64_t> sizes = running(batch_sizes, steps, batch);
  const Tensor xs = x.stride(2) == 1 ? x : x.contiguous();
  const Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const auto options = x.options();

  // Parameters at this call: packed weights (plain for one step), the two biases as one,
  // padded to whole panels.
  const bool plain = steps == 1;
  const Tiling layout = tiling();
  const Tensor bias_ih = contiguous(b_ih), bias_hh = contiguous(b_hh);
  const Tensor ch = contiguous(peephole), ln_ih_w = contiguous(ln_ih_weight);
  const Tensor ln_ih_b = contiguous(ln_ih_bias), ln_hh_w = contiguous(ln_hh_weight);
  const Tensor ln_hh_b = contiguous(ln_hh_bias), ln_c_w = contiguous(ln_c_weight);
  const Tensor ln_c_b = contiguous(ln_c_bias);
  const Weight weight_hr = projected ? prepare(*w_hr, proj, 0, proj, plain) : Weight();

  const bool ragged = !batch_sizes.empty();
  TORCH_CHECK(!(reverse || into.defined()) || !(keep || ragged),
              "lstmkit: a reversed layer, or one written into a given output, runs inference of "
              "whole sequences only");
  // training's buffers from the pool (pool.h), inference's output from torch's allocator
  const auto buffer = [&](at::IntArrayRef shape) {
    if (keep) return pooled(shape, at::kFloat, ragged);
    return ragged ? at::zeros(shape, options) : at::empty(shape, options);
  };
  Tensor output = into.defined() ? into : buffer({steps, batch, proj});
  // c_t in slot t % 2; or, kept for the backward, every c_t and every step's activated gates
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
  const int64_t so0 = output.stride(0), so1 = output.stride(1);
  float* const cells_p = cells.data_ptr<float>();
  const float* const x_p = xs.const_data_ptr<float>();
  const float* const h0_p = h0.const_data_ptr<float>();
  const float* const c0_p = c0.const_data_ptr<float>();
  const float zh = static_cast<float>(zone_h_p), zc = static_cast<float>(zone_c_p);
  const int64_t sx0 = xs.stride(0), sx1 = xs.stride(1);
  // row b of the input and of the output at the t-th step run: at time t, or reversed T - 1 - t
  const auto when = [steps, reverse](int64_t t) { return reverse ? steps - 1 - t : t; };
  const auto x_row = [&](int64_t t, int64_t b) { return x_p + when(t) * sx0 + b * sx1; };
  const auto out_row = [&](int64_t t, int64_t b) { return out_p + when(t) * so0 + b * so1; };
  const int64_t hr_panels = panels(proj);
  if (batch == 0) {  // nothing to run, and no worker to share it between
    return {output,
            at::empty({0, proj}, options),
            at::empty({0, hidden}, options),
            kept_gates,
            cells,
            hhat,
            chat,
            rstd,
            products_ih,
            stats_ih};
  }
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
  const int64_t threads = plain && 2 * weight_bytes <= level2_bytes() ? 1
                          : most_threads > 0
                              ? std::min<int64_t>(most_threads, at::get_num_threads())
                              : at::get_num_threads();
  const Split split =
      keep ? Split::kRows : choose_split(kind, projected, batch, hidden, large, threads);
  const int64_t wanted =
      split == Split::kUnits ? std::min(threads, hidden / kMinUnits) : std::min(threads, batch);
  const int64_t share = (hidden + wanted - 1) / wanted;  // units per worker (split by units)
  const int64_t unit_share = (share + kLanes - 1) / kLanes * kLanes;
  // shares rounded up to whole vectors can leave the last workers no units (H = 64 in shares of
  // 32 at three threads, with 16 lanes): those do not run
  const int64_t workers = split == Split::kUnits ? (hidden + unit_share - 1) / unit_share : wanted;
  // One row a worker whose share of W_hh outgrows its level-2 cache: each step's recurrent
  // product streams that share from the shared cache or memory, one vector times it, which the
  // dot products of one step (reading W_hh where it lies, one stream) do faster than the panels
  // (one stream a panel) and without packing it. Measured on an AMD EPYC Zen 4 (1 MB level-2),
  // B = 1, time plain / packed: H = 512 (4 MB) T = 50 0.83 at 1 thread, 0.74 at 2; H = 256
  // (1 MB) 1.01-1.03; H = 128 1.12-1.23 and H = 64 1.11-1.28 (the dots' sums across lanes cost
  // more than the panels' broadcasts where K is small and the weight comes from the level-2
  // cache anyway). LSTMKIT_NATIVE_ONE_ROW=plain or =packed forces either (tests).
  const int64_t hh_share = (split == Split::kUnits ? unit_share : hidden) * blocks * proj;
  const bool one_row = (split == Split::kUnits ? batch : (batch + workers - 1) / workers) == 1;
  const std::string_view one_row_choice = forced("LSTMKIT_NATIVE_ONE_ROW");
  const bool plain_hh =
      plain || (one_row && (one_row_choice.empty()
                                ? hh_share * static_cast<int64_t>(sizeof(float)) > level2_bytes()
                                : one_row_choice == "plain"));
  // The weights, for one worker (split by units) or for all.
  const auto packed = [&](int64_t j0, int64_t width) {
    const Tensor padded = joint_bias(bias_ih, bias_hh, hidden, j0, width, blocks);
    Weight ih = prepare(w_ih, hidden, j0, width, plain);
    return std::make_tuple(std::move(ih), prepare(w_hh, hidden, j0, width, plain_hh), padded,
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
      // bytes of a packed weight of this worker's gates, per row of K
      const int64_t row_bytes =
          panels(blocks * width) * kPanel * static_cast<int64_t>(sizeof(float));
      const bool few = count < (layernorm ? kLayerNormAheadRows + 1 : kMaxRows);
      if (few || (!plain && inputs_ahead(row_bytes * (in + proj), row_bytes * proj, layernorm))) {
        worker.block = few ? std::clamp<int64_t>(kAheadValues / (count * padded), 1,
                                                 std::min<int64_t>(64, steps))
                           : std::min(kAheadSteps, steps);
        worker.ahead.resize(worker.block * count * padded);
        worker.xb.resize(worker.block * count);
        worker.ab.resize(worker.block * count);
        for (int64_t i = 0; i < worker.block * count; ++i) {
          worker.ab[i] = worker.ahead.data() + i * padded;
        }
        const int64_t packed_bytes = row_bytes * (in + proj);  // W_ih and W_hh, packed
        worker.beside =
            count == 1 && !layernorm &&
            runs_beside(operand(nullptr, worker.hh, proj), operand(nullptr, worker.ih, in)) &&
            ahead_beside(packed_bytes);
        if (worker.beside) {
          worker.next.resize(worker.ahead.size());
          worker.xn.resize(worker.block * count);
          worker.an.resize(worker.block * count);
          for (int64_t i = 0; i < worker.block * count; ++i) {
            worker.an[i] = worker.next.data() + i * padded;
          }
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
          worker.xr[r] = x_row(t, b);
          worker.hr[r] = t == 0 ? h0_p + b * proj : out_row(t - 1, b);
        }
        const Operand input = operand(worker.xr.data(), worker.ih, in);
        const Operand recurrent = operand(worker.hr.data(), worker.hh, proj);
        float* const hat = worker.hat.data();
        if (worker.block > 0 && t == worker.start + worker.span) {  // a block begins
          worker.start = t;
          worker.span = std::min(worker.after(worker.span), steps - t);
        }
        const int64_t ahead_at = t - worker.start, span = worker.span;
        // a block after the first, its input half computed beside the last one's steps
        const bool ready = worker.beside && ahead_at == 0 && t > 0;
        if (ready) std::swap(worker.ab, worker.an);
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
          product(&recurrent, 1, n, columns, nullptr, worker.er.data(), layout);
          for (int64_t r = 0; r < n; ++r) {
            const int64_t at = t * batch + worker.rows[r];
            const float sd =
                layer_norm_into(z_rows[r], worker.er[r], kept_ln ? hhat_p + at * gates : hat,
                                pointer<float>(ln_hh_w), pointer<float>(ln_hh_b), nullptr, gates);
            if (kept_ln) rstd_p[2 * at] = sd;
          }
        };
        if (worker.block > 0) {  // z = (its block's input half) + the recurrent half
          if (ahead_at == 0 && worker.beside) {  // the next block's beside this one's steps
            const int64_t later = std::min(worker.after(span), steps - t - span);
            for (int64_t q = 0; q < later; ++q) {
              for (int64_t r = 0; r < count; ++r) {
                worker.xn[q * count + r] = x_row(t + span + q, worker.rows[r]);
              }
            }
            worker.side = {operand(worker.xn.data(), worker.ih, in), later * count, columns, bias_p,
                           worker.an.data()};
          }
          if (ahead_at == 0 && !ready) {
            for (int64_t q = 0; q < span; ++q) {
              for (int64_t r = 0; r < count; ++r) {
                worker.xb[q * count + r] = x_row(t + q, worker.rows[r]);
              }
            }
            const Operand inputs = operand(worker.xb.data(), worker.ih, in);
            product(&inputs, 1, span * count, columns, layernorm ? nullptr : bias_p,
                    worker.ab.data(), layout);
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
          } else if (worker.beside) {  // an even share of the side's tiles left at each step
            const int64_t left = span - ahead_at;
            const int64_t quota = (side_tiles(worker.side) - worker.side.done + left - 1) / left;
            product_beside(recurrent, columns, z, worker.side, quota);
          } else {
            product(&recurrent, 1, n, columns, nullptr, z, layout, true);
          }
        } else if (layernorm) {
          product(&input, 1, n, columns, nullptr, worker.er.data(), layout);
          for (int64_t r = 0; r < n; ++r) input_norm(worker.zr[r], worker.er[r], t, worker.rows[r]);
          recurrent_norm(worker.zr.data());
        } else {
          const Operand both[2] = {input, recurrent};
          product(both, 2, n, columns, bias_p, worker.zr.data(), layout);
        }
        for (int64_t r = 0; r < n; ++r) {
          const int64_t b = worker.rows[r];
          const float* c_prev =
              (t == 0 ? c0_p + b * hidden : cells_p + (slot(t - 1) * batch + b) * hidden) + j0;
          float* c_new = cells_p + (slot(t) * batch + b) * hidden + j0;
          float* h_out = out_row(t, b) + j0;
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
          product(&projection, 1, n, hr_panels, nullptr, worker.hw.data(), layout);
          for (int64_t r = 0; r < n; ++r) {
            std::memcpy(out_row(t, worker.rows[r]), worker.hw[r], proj * sizeof(float));
          }
        }
        if (zh != 0.0f) {
          const int64_t zoned = projected ? proj : width;
          for (int64_t r = 0; r < n; ++r) {
            zone(out_row(t, worker.rows[r]) + j0, worker.hr[r] + j0, zh, zoned);
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
    const float* h = last == 0 ? h0_p + b * proj : out_row(last - 1, b);
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
  const int64_t gates = gate_blocks(kind) * hidden;
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

// zoneout's probabilities for operator `op` (named in the message).
void check_zoneout(const char* op, double zone_h_p, double zone_c_p) {
  TORCH_CHECK(0 <= zone_h_p && zone_h_p < 1 && 0 <= zone_c_p && zone_c_p < 1, op,
              ": zoneout probabilities must be in [0, 1), got ", zone_h_p, " and ", zone_c_p);
}

// Whether a bidirectional layer's two directions, each with weights (W_ih and W_hh) of
// `weight_bytes`, run at once, one thread each, rather than one after the other on every
// thread: at two threads, where each direction then runs alone on its core without a wait per
// step, and where the weights are not large (as choose_split says: each core then streams a
// whole direction's, not half of each). Measured on an AMD EPYC Zen 4 (1 MB level-2, 32 MB
// level-3), inference at 2 threads, time together / apart (alternated, noisy): bidirectional
// H = I = 256 (2 and 3 MB), B = 32, 2 layers 0.86-0.96, B = 4 0.98, B = 64 0.99, B = 128 0.86;
// H = 128, B = 1 0.89; H = 64, B = 8 0.99; but H = 384 (4.7 MB) B = 32 1.03, H = 512 (8 MB)
// B = 32 1.04-1.15, B = 64 1.01-1.06. LSTMKIT_NATIVE_DIRECTIONS=together or =apart forces
// either (tests).
bool directions_together(int64_t weight_bytes) {
  const std::string_view choice = forced("LSTMKIT_NATIVE_DIRECTIONS");
  if (!choice.empty()) return choice == "together";
  return at::get_num_threads() == 2 && weight_bytes <= kUnitsWeightsL2 * level2_bytes();
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
  check_zoneout("lstmkit::inference", zone_h_p, zone_c_p);
  const TrainingForward out = run(x, h0_in, c0_in, w_ih, w_hh, b_ih, b_hh, w_hr, peephole,
                                  ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_c_weight,
                                  ln_c_bias, kind, zone_h_p, zone_c_p, batch_sizes, false);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

std::tuple<Tensor, Tensor, Tensor> inference_stack(const Tensor& x, const std::optional<Tensor>& h0,
                                                   const std::optional<Tensor>& c0,
                                                   const c10::List<std::optional<Tensor>>& params,
                                                   c10::string_view kind_name, double zone_h_p,
                                                   double zone_c_p, int64_t directions) {
  constexpr int64_t kPerLayer = 12;  // inference's parameters, weight_ih to ln_c_bias
  TORCH_CHECK(directions == 1 || directions == 2,
              "lstmkit::inference_stack runs 1 or 2 directions, got ", directions);
  const int64_t count = static_cast<int64_t>(params.size()) / kPerLayer;  // layer-directions
  const int64_t layers = count / directions;
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(params.size()) == count * kPerLayer &&
                  count == layers * directions && params.get(1).has_value() &&
                  params.get(1)->dim() == 2 && x.dim() == 3,
              "lstmkit::inference_stack takes an input (T, B, I) and 12 parameters a "
              "layer-direction, a 2-D weight_hh among them, got an input of ",
              x.sizes(), " and ", params.size(), " parameters for ", directions, " directions");
  TORCH_CHECK(h0.has_value() == c0.has_value(),
              "lstmkit::inference_stack takes h0 and c0 or neither, got ",
              h0.has_value() ? "h0 alone" : "c0 alone");
  check_zoneout("lstmkit::inference_stack", zone_h_p, zone_c_p);
  // Without states, zeros: (L D, B, P) and (L D, B, H), P and H from the first W_hh (all
  // layers' are alike), made here rather than by two more calls from Python (~7 us of a call).
  const Tensor& w_hh = *params.get(1);
  const int64_t proj = w_hh.size(1);
  const Kind kind = parse_kind(std::string_view(kind_name.data(), kind_name.size()));
  const int64_t hidden = w_hh.size(0) / gate_blocks(kind);
  const auto zeros = [&](int64_t size) {
    Tensor out = at::empty({count, x.size(1), size}, x.options());
    std::memset(out.data_ptr(), 0, out.nbytes());
    return out;
  };
  const Tensor h_in = h0.has_value() ? h0->contiguous() : zeros(proj);
  const Tensor c_in = c0.has_value() ? c0->contiguous() : zeros(hidden);
  TORCH_CHECK(h_in.dim() == 3 && c_in.dim() == 3 && h_in.size(0) == count && c_in.size(0) == count,
              "lstmkit::inference_stack takes h0 (L D, B, P) and c0 (L D, B, H) for its ", layers,
              " layers of ", directions, " directions, got h0 ", h_in.sizes(), " and c0 ",
              c_in.sizes());
  TORCH_CHECK(h_in.scalar_type() == at::kFloat && c_in.scalar_type() == at::kFloat,
              "lstmkit::inference_stack takes float32 states, got ", h_in.scalar_type(), " and ",
              c_in.scalar_type());
  // Each layer-direction's states as views made without the dispatcher (a select costs ~1 us,
  // as much as a fifth of a small layer's step), its final ones copied into the stacked outputs.
  Tensor h_n = at::empty(h_in.sizes(), h_in.options());
  Tensor c_n = at::empty(c_in.sizes(), c_in.options());
  const auto layer_of = [](const Tensor& states, int64_t k) {
    const int64_t size = states.size(1) * states.size(2);
    return at::from_blob(const_cast<float*>(states.const_data_ptr<float>()) + k * size,
                         {states.size(1), states.size(2)}, states.options());
  };
  const auto copy_into = [](Tensor& states, int64_t k, const Tensor& final) {
    std::memcpy(states.data_ptr<float>() + k * final.numel(), final.const_data_ptr<float>(),
                final.numel() * sizeof(float));
  };
  Tensor input = x;
  for (int64_t layer = 0; layer < layers; ++layer) {
    // both directions write their halves of one (T, B, 2P) output
    Tensor output =
        directions == 2 ? at::empty({x.size(0), x.size(1), 2 * proj}, x.options()) : Tensor();
    const auto param = [&](int64_t k, int64_t i) { return params.get(k * kPerLayer + i); };
    for (int64_t k = layer * directions; k < (layer + 1) * directions; ++k) {
      TORCH_CHECK(param(k, 0).has_value() && param(k, 1).has_value(),
                  "lstmkit::inference_stack: layer-direction ", k,
                  " needs weight_ih and weight_hh");
      check_layer("lstmkit::inference_stack", input, layer_of(h_in, k), layer_of(c_in, k),
                  *param(k, 0), *param(k, 1), param(k, 2), param(k, 3), param(k, 4), param(k, 5),
                  param(k, 6), param(k, 7), param(k, 8), param(k, 9), param(k, 10), param(k, 11),
                  kind_name, kind);
    }
    // layer-direction k (direction k - layer D), on at most `threads` threads (0: all)
    const auto forward = [&](int64_t k, int64_t threads) {
      const int64_t direction = k - layer * directions;
      const TrainingForward out = run(
          input, layer_of(h_in, k), layer_of(c_in, k), *param(k, 0), *param(k, 1), param(k, 2),
          param(k, 3), param(k, 4), param(k, 5), param(k, 6), param(k, 7), param(k, 8), param(k, 9),
          param(k, 10), param(k, 11), kind, zone_h_p, zone_c_p, {}, false, direction == 1,
          directions == 2 ? output.narrow(2, direction * proj, proj) : Tensor(), threads);
      copy_into(h_n, k, std::get<1>(out));
      copy_into(c_n, k, std::get<2>(out));
      if (directions == 1) output = std::get<0>(out);
    };
    const int64_t weight_bytes = (param(layer * directions, 0)->numel() + w_hh.numel()) *
                                 static_cast<int64_t>(sizeof(float));
    if (directions == 2 && directions_together(weight_bytes)) {
      at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
        for (int64_t direction = begin; direction < end; ++direction) {
          forward(layer * 2 + direction, 1);
        }
      });
    } else {
      for (int64_t k = layer * directions; k < (layer + 1) * directions; ++k) forward(k, 0);
    }
    input = std::move(output);
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

}  // namespace lstmkit
