// One layer-direction of the standard LSTM over a whole sequence, forward and hand-written
// backward (back-propagation through time), registered as the custom operators
// lstmkit::lstm_forward and lstmkit::lstm_backward. Gate blocks in torch.nn.LSTM's order
// (i, f, g, o); the equations are those of lstmkit.cells.lstm_step.
//
// Forward: the input half of every step's gates, x W_ih^T + b_ih + b_hh, is ONE product over
// all steps before the loop; step t adds h_{t-1} W_hh^T to its row in place (one addmm), then
// ONE pass over the gates applies the activations and the cell update and writes h_t (or, with
// a projection, o * tanh(c_t), then one product by W_hr^T). Nothing is allocated inside the
// loop. In training the activated gates and every c_t are kept for the backward.
//
// Backward: per step one pass gives the pre-activation gradients and the cell-state gradient,
// then dh_{t-1} = dgates W_hh (one product); after the loop the weight gradients are products
// over all steps, the input gradient one product, the bias gradient one sum.
//
// Lengths: batch_sizes[t] is the number of sequences still running at step t, the batch sorted
// by decreasing length (empty: all B). Step t touches only its first batch_sizes[t] rows;
// finished rows keep their state and output zeros.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lstmkit {
namespace {

using at::Tensor;

// exp(x) for float32 that the compiler vectorises (std::exp stays a scalar call without
// -ffast-math): x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), and 2^n
// put into the exponent bits. Relative error about 2e-7 (a few ulps). Written so that GCC
// vectorises it under -fno-trapping-math: selects, not fmin/fmax; rounding to the nearest
// integer by adding and subtracting 1.5 * 2^23, not std::floor.
inline float exp_vectorisable(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // 2^n stays a normal float
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln2 split in two so that n * ln2_hi is exact
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_vectorisable(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
// float32: tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7); float64: the library's tanh.
inline float tanh_(float x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }
inline double tanh_(double x) { return std::tanh(x); }

// One row of step t of the forward: the four pre-activation blocks (H each) receive their
// activations, c = f c_prev + i g, h = o tanh(c). The pointers never overlap (no buffer is
// updated in place), which lets the compiler vectorise the loop without run-time checks.
template <typename T>
void gates_forward_row(T* __restrict__ gi, T* __restrict__ gf, T* __restrict__ gg,
                       T* __restrict__ go, const T* __restrict__ c_prev, T* __restrict__ c,
                       T* __restrict__ h, std::int64_t hidden) {
  for (std::int64_t j = 0; j < hidden; ++j) {
    const T i = sigmoid(gi[j]);
    const T f = sigmoid(gf[j]);
    const T cand = tanh_(gg[j]);
    const T o = sigmoid(go[j]);
    const T cell = f * c_prev[j] + i * cand;
    gi[j] = i;
    gf[j] = f;
    gg[j] = cand;
    go[j] = o;
    c[j] = cell;
    h[j] = o * tanh_(cell);
  }
}

// Step t of the forward, rows [0, n): `g` (n, 4H) holds the pre-activations and receives the
// activations, `c` receives c_t, `h` o tanh(c_t); rows of `h` are `ldh` apart.
template <typename T>
void gates_forward(T* g, const T* c_prev, T* c, T* h, std::int64_t n, std::int64_t hidden,
                   std::int64_t ldh) {
  for (std::int64_t b = 0; b < n; ++b) {
    T* gi = g + b * 4 * hidden;
    gates_forward_row(gi, gi + hidden, gi + 2 * hidden, gi + 3 * hidden, c_prev + b * hidden,
                      c + b * hidden, h + b * ldh, hidden);
  }
}

// One row of step t of the backward. In: the activated gates, c_{t-1}, c_t, dm = dL/d(o tanh
// c_t), and dc = dL/dc_t from later steps. Out: the pre-activation gradients (four blocks),
// and dc becomes dL/dc_{t-1}.
template <typename T>
void gates_backward_row(const T* __restrict__ gi, const T* __restrict__ gf,
                        const T* __restrict__ gg, const T* __restrict__ go,
                        const T* __restrict__ c_prev, const T* __restrict__ c,
                        const T* __restrict__ dm, T* __restrict__ dc, T* __restrict__ di,
                        T* __restrict__ df, T* __restrict__ dcand, T* __restrict__ dout,
                        std::int64_t hidden) {
  for (std::int64_t j = 0; j < hidden; ++j) {
    const T i = gi[j], f = gf[j], cand = gg[j], o = go[j];
    const T tc = tanh_(c[j]);
    const T dcell = dc[j] + dm[j] * o * (T(1) - tc * tc);
    di[j] = dcell * cand * i * (T(1) - i);
    df[j] = dcell * c_prev[j] * f * (T(1) - f);
    dcand[j] = dcell * i * (T(1) - cand * cand);
    dout[j] = dm[j] * tc * o * (T(1) - o);
    dc[j] = dcell * f;
  }
}

// Step t of the backward, rows [0, n): `dg` (n, 4H) receives the pre-activation gradients,
// `dc` goes from dL/dc_t to dL/dc_{t-1}; `m`, where not null, receives o tanh(c_t).
template <typename T>
void gates_backward(const T* g, const T* c_prev, const T* c, const T* dm, T* dc, T* dg, T* m,
                    std::int64_t n, std::int64_t hidden) {
  for (std::int64_t b = 0; b < n; ++b) {
    const T* gi = g + b * 4 * hidden;
    T* d = dg + b * 4 * hidden;
    const std::int64_t row = b * hidden;
    gates_backward_row(gi, gi + hidden, gi + 2 * hidden, gi + 3 * hidden, c_prev + row, c + row,
                       dm + row, dc + row, d, d + hidden, d + 2 * hidden, d + 3 * hidden, hidden);
    if (m != nullptr) {
      for (std::int64_t j = 0; j < hidden; ++j) m[row + j] = gi[3 * hidden + j] * tanh_(c[row + j]);
    }
  }
}

// Running rows at each step: batch_sizes, or `batch` at every step when it is empty.
std::vector<std::int64_t> running(at::IntArrayRef batch_sizes, std::int64_t steps,
                                  std::int64_t batch) {
  if (batch_sizes.empty()) return std::vector<std::int64_t>(steps, batch);
  TORCH_CHECK(static_cast<std::int64_t>(batch_sizes.size()) == steps, "batch_sizes has ",
              batch_sizes.size(), " entries for ", steps, " steps");
  std::int64_t previous = batch;
  for (const std::int64_t n : batch_sizes) {
    TORCH_CHECK(0 <= n && n <= previous, "batch_sizes must be non-increasing in [0, ", batch,
                "], got ", batch_sizes);
    previous = n;
  }
  return batch_sizes.vec();
}

void check_inputs(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                  const Tensor& w_hh, const std::optional<Tensor>& w_hr) {
  TORCH_CHECK(x.device().is_cpu(), "lstmkit::lstm_* runs on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lstmkit::lstm_* takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 2 && c0.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2,
              "lstmkit::lstm_*: x (T, B, I), h0 (B, P), c0 (B, H), weights 2-d");
  const std::int64_t hidden = w_hh.size(0) / 4, proj = w_hh.size(1);
  TORCH_CHECK(w_hh.size(0) == 4 * hidden && w_ih.size(0) == 4 * hidden &&
                  w_ih.size(1) == x.size(2) && h0.size(0) == x.size(1) && h0.size(1) == proj &&
                  c0.size(0) == x.size(1) && c0.size(1) == hidden,
              "lstmkit::lstm_*: inconsistent sizes");
  TORCH_CHECK(!w_hr.has_value() || (w_hr->size(0) == proj && w_hr->size(1) == hidden),
              "lstmkit::lstm_*: weight_hr must be (P, H)");
}

// Elements of the input-projection block that inference computes at once (16 MiB of float32).
constexpr std::int64_t kInferenceBlock = std::int64_t{1} << 22;

// A (rows, cols) row-major view of memory inside one of this file's buffers, made without the
// dispatcher: select/narrow cost 1-2 us each, as much as a whole step's gate pass at B=1.
template <typename T>
Tensor rows_of(const T* data, std::int64_t rows, std::int64_t cols,
               const at::TensorOptions& options) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, options);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(
    const Tensor& x_in, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, at::IntArrayRef batch_sizes, bool training) {
  check_inputs(x_in, h0_in, c0_in, w_ih, w_hh, w_hr);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "lstmkit::lstm_forward: both biases or none");
  const Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const std::int64_t steps = x.size(0), batch = x.size(1), inp = x.size(2);
  const std::int64_t hidden = w_hh.size(0) / 4, proj = w_hh.size(1);
  const std::vector<std::int64_t> sizes = running(batch_sizes, steps, batch);
  const bool ragged = !batch_sizes.empty();
  const auto options = x.options();

  // The input half of the gates of `chunk` steps at a time, then each step's gates in place:
  // training keeps all of them (T, B, 4H), one product; inference a block of steps of about
  // kInferenceBlock elements, so that a long sequence does not hold 4x its output.
  const std::int64_t step_elems = std::max<std::int64_t>(1, batch * 4 * hidden);
  const std::int64_t chunk =
      training ? steps : std::max<std::int64_t>(1, std::min(steps, kInferenceBlock / step_elems));
  Tensor gates = at::empty({chunk, batch, 4 * hidden}, options);
  const Tensor bias = b_ih.has_value() ? *b_ih + *b_hh : Tensor();
  const auto project = [&](std::int64_t t0) {
    const std::int64_t len = std::min(chunk, steps - t0);
    Tensor out = gates.narrow(0, 0, len).view({len * batch, 4 * hidden});
    const Tensor xs = x.narrow(0, t0, len).view({len * batch, inp});
    if (bias.defined()) {
      at::addmm_out(out, bias, xs, w_ih.t());
    } else {
      at::mm_out(out, xs, w_ih.t());
    }
  };
  // Finished rows must read as zero: zeros only where some sequence ends early.
  Tensor output =
      ragged ? at::zeros({steps, batch, proj}, options) : at::empty({steps, batch, proj}, options);
  // Training keeps every c_t (zero past a sequence's end, like the output); inference two
  // slots, c_t in slot t % 2 (a row of a finished sequence is never written again, so its
  // last slot still holds its final state).
  Tensor cells = training && ragged ? at::zeros({steps, batch, hidden}, options)
                                    : at::empty({training ? steps : 2, batch, hidden}, options);
  const auto slot = [training](std::int64_t t) { return training ? t : t % 2; };
  Tensor m = w_hr.has_value() ? at::empty({batch, hidden}, options) : Tensor();
  const Tensor w_hh_t = w_hh.t();
  const Tensor w_hr_t = w_hr.has_value() ? w_hr->t() : Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmkit::lstm_forward", [&] {
    scalar_t* const gates_p = gates.data_ptr<scalar_t>();
    scalar_t* const output_p = output.data_ptr<scalar_t>();
    scalar_t* const cells_p = cells.data_ptr<scalar_t>();
    const scalar_t* const h0_p = h0.const_data_ptr<scalar_t>();
    const scalar_t* const c0_p = c0.const_data_ptr<scalar_t>();
    for (std::int64_t t = 0; t < steps; ++t) {
      const std::int64_t n = sizes[t];
      if (n == 0) break;
      if (t % chunk == 0) project(t);
      scalar_t* g = gates_p + (t % chunk) * batch * 4 * hidden;
      const scalar_t* h_prev = t == 0 ? h0_p : output_p + (t - 1) * batch * proj;
      rows_of(g, n, 4 * hidden, options).addmm_(rows_of(h_prev, n, proj, options), w_hh_t);
      const scalar_t* c_prev = t == 0 ? c0_p : cells_p + slot(t - 1) * batch * hidden;
      scalar_t* c = cells_p + slot(t) * batch * hidden;
      scalar_t* h_t = output_p + t * batch * proj;
      if (w_hr.has_value()) {
        scalar_t* m_p = m.data_ptr<scalar_t>();
        gates_forward(g, c_prev, c, m_p, n, hidden, hidden);
        Tensor h_rows = rows_of(h_t, n, proj, options);
        at::mm_out(h_rows, rows_of(m_p, n, hidden, options), w_hr_t);  // (n, P)
      } else {
        gates_forward(g, c_prev, c, h_t, n, hidden, proj);
      }
    }
  });

  // Each sequence's state after its last step (its initial state if it has none).
  Tensor h_n = at::empty({batch, proj}, options);
  Tensor c_n = at::empty({batch, hidden}, options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmkit::lstm_forward", [&] {
    const auto copy_row = [b_size = batch](Tensor& to, std::int64_t b, const Tensor& from,
                                           std::int64_t t, std::int64_t width) {
      std::memcpy(to.data_ptr<scalar_t>() + b * width,
                  from.const_data_ptr<scalar_t>() + (t * b_size + b) * width,
                  width * sizeof(scalar_t));
    };
    for (std::int64_t b = 0, last = steps; b < batch; ++b) {
      while (last > 0 && sizes[last - 1] <= b) --last;  // sequence b runs steps [0, last)
      if (last == 0) {
        copy_row(h_n, b, h0, 0, proj);
        copy_row(c_n, b, c0, 0, hidden);
      } else {
        copy_row(h_n, b, output, last - 1, proj);
        copy_row(c_n, b, cells, slot(last - 1), hidden);
      }
    }
  });
  if (!training) {
    gates = at::empty({0}, options);
    cells = at::empty({0}, options);
  }
  return {output, h_n, c_n, gates, cells};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_h_n,
    const std::optional<Tensor>& grad_c_n, const Tensor& x_in, const Tensor& h0_in,
    const Tensor& c0_in, const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
    const Tensor& output, const Tensor& gates, const Tensor& cells, at::IntArrayRef batch_sizes,
    bool has_bias, bool input_grad) {
  check_inputs(x_in, h0_in, c0_in, w_ih, w_hh, w_hr);
  const Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const std::int64_t steps = x.size(0), batch = x.size(1), inp = x.size(2);
  const std::int64_t hidden = w_hh.size(0) / 4, proj = w_hh.size(1);
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({steps, batch, 4 * hidden}) &&
                  cells.sizes() == at::IntArrayRef({steps, batch, hidden}) &&
                  output.sizes() == at::IntArrayRef({steps, batch, proj}),
              "lstmkit::lstm_backward needs the saved gates, cells and output of a training "
              "forward");
  const std::vector<std::int64_t> sizes = running(batch_sizes, steps, batch);
  const bool ragged = !batch_sizes.empty();
  const auto options = x.options();
  const Tensor saved_gates = gates.contiguous(), saved_cells = cells.contiguous();

  // The state gradients flowing back in time start as those of (h_n, c_n): a finished
  // sequence's rows wait untouched until the step where it ended.
  Tensor dh =
      grad_h_n.has_value() ? grad_h_n->contiguous().clone() : at::zeros({batch, proj}, options);
  Tensor dc =
      grad_c_n.has_value() ? grad_c_n->contiguous().clone() : at::zeros({batch, hidden}, options);
  const Tensor dout = grad_output.has_value() ? grad_output->contiguous() : Tensor();
  // Rows of finished sequences are never written: zeros only where there are any.
  Tensor dgates = ragged ? at::zeros({steps, batch, 4 * hidden}, options)
                         : at::empty({steps, batch, 4 * hidden}, options);
  const bool projected = w_hr.has_value();
  // With a projection: every step's dL/dh_t and o tanh(c_t), for dW_hr after the loop.
  Tensor dh_seq = projected ? (ragged ? at::zeros({steps, batch, proj}, options)
                                      : at::empty({steps, batch, proj}, options))
                            : Tensor();
  Tensor m_seq = projected ? (ragged ? at::zeros({steps, batch, hidden}, options)
                                     : at::empty({steps, batch, hidden}, options))
                           : Tensor();
  Tensor dm = at::empty({batch, hidden}, options);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstmkit::lstm_backward", [&] {
    scalar_t* const dh_p = dh.data_ptr<scalar_t>();
    scalar_t* const dc_p = dc.data_ptr<scalar_t>();
    scalar_t* const dm_p = dm.data_ptr<scalar_t>();
    scalar_t* const dgates_p = dgates.data_ptr<scalar_t>();
    const scalar_t* const dout_p = dout.defined() ? dout.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* const gates_p = saved_gates.const_data_ptr<scalar_t>();
    const scalar_t* const cells_p = saved_cells.const_data_ptr<scalar_t>();
    const scalar_t* const c0_p = c0.const_data_ptr<scalar_t>();
    for (std::int64_t t = steps - 1; t >= 0; --t) {
      const std::int64_t n = sizes[t];
      if (n == 0) continue;
      if (dout_p != nullptr) {  // dh: everything that reaches h_t, (n, P)
        const scalar_t* d = dout_p + t * batch * proj;
        for (std::int64_t k = 0; k < n * proj; ++k) dh_p[k] += d[k];
      }
      Tensor dh_rows = rows_of(dh_p, n, proj, options);
      const scalar_t* dm_t = dh_p;
      scalar_t* m_t = nullptr;
      if (projected) {
        std::memcpy(dh_seq.data_ptr<scalar_t>() + t * batch * proj, dh_p,
                    n * proj * sizeof(scalar_t));
        Tensor dm_rows = rows_of(dm_p, n, hidden, options);
        at::mm_out(dm_rows, dh_rows, *w_hr);  // (n, H)
        dm_t = dm_p;
        m_t = m_seq.data_ptr<scalar_t>() + t * batch * hidden;
      }
      const scalar_t* c_prev = t == 0 ? c0_p : cells_p + (t - 1) * batch * hidden;
      scalar_t* dg = dgates_p + t * batch * 4 * hidden;
      gates_backward(gates_p + t * batch * 4 * hidden, c_prev, cells_p + t * batch * hidden, dm_t,
                     dc_p, dg, m_t, n, hidden);
      at::mm_out(dh_rows, rows_of(dg, n, 4 * hidden, options), w_hh);  // dL/dh_{t-1}, (n, P)
    }
  });

  const Tensor flat = dgates.view({steps * batch, 4 * hidden});
  Tensor dw_ih = at::mm(flat.t(), x.view({steps * batch, inp}));  // (4H, I)
  // h_{t-1} of step t is h0 at t = 0 and output[t - 1] after: two products, no copy.
  Tensor dw_hh = at::mm(dgates[0].t(), h0);  // (4H, P)
  if (steps > 1) {
    dw_hh.addmm_(flat.narrow(0, batch, (steps - 1) * batch).t(),
                 output.narrow(0, 0, steps - 1).reshape({(steps - 1) * batch, proj}));
  }
  Tensor dx = input_grad ? at::mm(flat, w_ih).view({steps, batch, inp}) : at::empty({0}, options);
  Tensor db = has_bias ? flat.sum(0) : at::empty({0}, options);
  Tensor dw_hr = projected ? at::mm(dh_seq.view({steps * batch, proj}).t(),
                                    m_seq.view({steps * batch, hidden}))
                           : at::empty({0}, options);
  return {dx, dh, dc, dw_ih, dw_hh, db, dw_hr};
}

}  // namespace

TORCH_LIBRARY(lstmkit, m) {
  m.def(
      "lstm_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, int[] batch_sizes, bool training) -> (Tensor output, "
      "Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, "
      "Tensor gates, Tensor cells, int[] batch_sizes, bool has_bias, bool input_grad) -> "
      "(Tensor dx, Tensor dh0, Tensor dc0, Tensor dw_ih, Tensor dw_hh, Tensor db, "
      "Tensor dw_hr)");
}

TORCH_LIBRARY_IMPL(lstmkit, CPU, m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
}

}  // namespace lstmkit
