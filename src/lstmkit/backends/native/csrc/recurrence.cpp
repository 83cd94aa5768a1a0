// The recurrence of one layer-direction over a whole sequence, forward and hand-written
// backward (back-propagation through time), for the lstm, peephole, cifg and layernorm cells
// of lstmkit.cells, with recurrent dropout and zoneout, registered as the custom operators
// lstmkit::recurrence and lstmkit::recurrence_backward. Gate blocks in torch.nn.LSTM's order
// (i, f, g, o); cifg has three, (f, g, o).
//
// The input half of the gates, xp (T, B, GH), is the operator's input: the cell's own
// project_input computes it for all steps, as one product, before the call. Step t, on the
// first n = batch_sizes[t] rows (the sequences still running, the batch sorted by decreasing
// length; finished rows keep their state and output zeros):
//
//   a = h_{t-1} r                          r: the recurrent dropout mask (B, P), or 1
//   z = xp_t + a W_hh^T                     lstm, peephole, cifg (one addmm)
//   z = xp_t + LN(a W_hh^T; g_hh, b_hh)     layernorm (xp_t holds LN(x W_ih^T) and the biases)
//   then ONE pass over the gates, per cell (see the *_forward_row functions), gives c' and
//   m = o tanh(y), y = c' or LN(c'; g_c, b_c);  h' = m, or m W_hr^T with a projection
//   h_t = w_h h_{t-1} + (1 - w_h) h',  c_t = w_c c_{t-1} + (1 - w_c) c'     zoneout
//
// w_h, w_c are the zoneout masks as 0 / 1 (training, (T, B, .)) or the probability p
// (evaluation). Nothing is allocated inside the loop. In training the activated gates, every
// c_t (and c' under zoneout), and for layernorm the normalised values and their 1 / std, are
// kept for the backward.
//
// Backward walks t down with dh, dc, the gradients reaching h_t and c_t: one pass over the
// gates gives dz and dL/dc_{t-1}, then dL/dh_{t-1} = (dz W_hh) r (layernorm: LN_hh's
// backward of dz first) plus the zoneout share. dz is the gradient of xp; after the loop
// every weight gradient is one product or reduction over all steps. In float32 without masks,
// the backward loop runs on backward_rows.cpp's row-split kernel instead (backward_kept; the
// forward of those layers is lstmkit::training_forward, whose kept values are this forward's, and
// for layernorm it also adds up LN_hh's gain and shift gradients); the weight gradients stay here.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cell.h"
#include "layer.h"
#include "ops.h"
#include "pool.h"
#include "products.h"

namespace lstmkit {
namespace {

using at::Tensor;

// The zoneout weight of the previous state: the mask's element, or the probability.
template <typename T>
struct Zone {
  const T* mask;  // (T, B, width) as 0 / 1, or null
  T p;            // where mask is null: 0 (off) or the probability (evaluation)
  int64_t width;  // P or H

  bool on() const { return mask != nullptr || p != T(0); }
  // new_ (n rows, ld apart) becomes w old + (1 - w) new_ at step t.
  void apply(T* new_, const T* old, int64_t t, int64_t batch, int64_t n) const {
    if (mask != nullptr) {
      const T* w = mask + t * batch * width;
      for (int64_t k = 0; k < n * width; ++k) new_[k] = w[k] * old[k] + (T(1) - w[k]) * new_[k];
    } else {
      for (int64_t k = 0; k < n * width; ++k) new_[k] = p * old[k] + (T(1) - p) * new_[k];
    }
  }
  // Backward at step t: keep = d w (what passes to the previous state), d = d (1 - w).
  void split(T* d, T* keep, int64_t t, int64_t batch, int64_t n) const {
    if (mask != nullptr) {
      const T* w = mask + t * batch * width;
      for (int64_t k = 0; k < n * width; ++k) {
        keep[k] = d[k] * w[k];
        d[k] *= T(1) - w[k];
      }
    } else {
      for (int64_t k = 0; k < n * width; ++k) {
        keep[k] = d[k] * p;
        d[k] *= T(1) - p;
      }
    }
  }
};

// The rows [0, n) of one step's pass over `width` values each, as f(begin, end), shared
// between threads where each share holds at least kParallelValues values: a smaller pass does
// not repay waking another thread. `serial` keeps it in one thread.
constexpr int64_t kParallelValues = 16384;

template <typename F>
void over_rows(int64_t n, int64_t width, bool serial, const F& f) {
  at::parallel_for(0, n, serial ? n : std::max<int64_t>(1, kParallelValues / width), f);
}

// What both operators take besides the state: the weights, the cell's extra parameters and
// the regularisers' masks, checked against the input half xp (T, B, GH) and c0 (B, H).
struct Layer {
  Kind kind;
  int64_t steps, batch, hidden, proj, blocks;
  Tensor w_hh, w_hr, peephole, ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias;
  Tensor recurrent, zone_h, zone_c;
  double zone_h_p, zone_c_p;
};

void check_shape(const Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "lstmkit::recurrence: ", name, " must be ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() != at::kBool, "lstmkit::recurrence: ", name, " must be ",
              "floating point, got bool");
}

Tensor optional_param(const std::optional<Tensor>& t, bool wanted, at::IntArrayRef shape,
                      const char* name, const std::string& kind) {
  TORCH_CHECK(t.has_value() == wanted, "lstmkit::recurrence: kind ", kind,
              wanted ? " needs " : " takes no ", name);
  if (!wanted) return Tensor();
  check_shape(*t, shape, name);
  return t->contiguous();
}

Layer make_layer(const Tensor& xp, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                 const std::optional<Tensor>& w_hr, const std::optional<Tensor>& peephole,
                 const std::optional<Tensor>& ln_hh_weight, const std::optional<Tensor>& ln_hh_bias,
                 const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
                 std::string_view kind_name, const std::optional<Tensor>& recurrent,
                 const std::optional<Tensor>& zone_h, const std::optional<Tensor>& zone_c,
                 double zone_h_p, double zone_c_p) {
  TORCH_CHECK(xp.device().is_cpu(), "lstmkit::recurrence runs on the CPU, got ", xp.device());
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble,
              "lstmkit::recurrence takes float32 or float64, got ", xp.scalar_type());
  TORCH_CHECK(xp.dim() == 3 && c0.dim() == 2 && w_hh.dim() == 2,
              "lstmkit::recurrence: xp (T, B, GH), h0 (B, P), c0 (B, H), weight_hh (GH, P)");
  Layer l;
  l.kind = parse_kind(kind_name);
  l.steps = xp.size(0);
  l.batch = xp.size(1);
  l.hidden = c0.size(1);
  l.proj = w_hh.size(1);
  l.blocks = gate_blocks(l.kind);
  const int64_t rows = l.blocks * l.hidden;
  check_shape(xp, {l.steps, l.batch, rows}, "xp");
  check_shape(h0, {l.batch, l.proj}, "h0");
  check_shape(c0, {l.batch, l.hidden}, "c0");
  check_shape(w_hh, {rows, l.proj}, "weight_hh");
  for (const Tensor* t : {&h0, &c0, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == xp.scalar_type(), "lstmkit::recurrence: every tensor must be ",
                xp.scalar_type(), ", got ", t->scalar_type());
  }
  l.w_hh = w_hh.contiguous();
  TORCH_CHECK(w_hr.has_value() || l.proj == l.hidden,
              "lstmkit::recurrence: without weight_hr, h0 must be (B, H)");
  if (w_hr.has_value()) {
    check_shape(*w_hr, {l.proj, l.hidden}, "weight_hr");
    l.w_hr = w_hr->contiguous();
  }
  const std::string kind(kind_name);
  l.peephole =
      optional_param(peephole, l.kind == Kind::kPeephole, {3 * l.hidden}, "weight_ch", kind);
  const bool ln = l.kind == Kind::kLayerNorm;
  l.ln_hh_weight = optional_param(ln_hh_weight, ln, {rows}, "ln_hh_weight", kind);
  l.ln_hh_bias = optional_param(ln_hh_bias, ln, {rows}, "ln_hh_bias", kind);
  l.ln_c_weight = optional_param(ln_c_weight, ln, {l.hidden}, "ln_c_weight", kind);
  l.ln_c_bias = optional_param(ln_c_bias, ln, {l.hidden}, "ln_c_bias", kind);
  if (recurrent.has_value()) {
    check_shape(*recurrent, {l.batch, l.proj}, "recurrent");
    l.recurrent = recurrent->contiguous();
  }
  if (zone_h.has_value()) {
    check_shape(*zone_h, {l.steps, l.batch, l.proj}, "zone_h");
    l.zone_h = zone_h->contiguous();
  }
  if (zone_c.has_value()) {
    check_shape(*zone_c, {l.steps, l.batch, l.hidden}, "zone_c");
    l.zone_c = zone_c->contiguous();
  }
  TORCH_CHECK(0 <= zone_h_p && zone_h_p < 1 && 0 <= zone_c_p && zone_c_p < 1,
              "lstmkit::recurrence: zoneout probabilities must be in [0, 1), got ", zone_h_p,
              " and ", zone_c_p);
  l.zone_h_p = zone_h.has_value() ? 0.0 : zone_h_p;
  l.zone_c_p = zone_c.has_value() ? 0.0 : zone_c_p;
  return l;
}

// Whether the backward runs on the rows kernel (backward_kept): float32 and no regulariser's
// mask or probability (the layers lstmkit::training_forward runs; this file's forward keeps the
// same values for them).
bool by_rows(const Layer& l, at::ScalarType dtype) {
  return dtype == at::kFloat && !l.recurrent.defined() && !l.zone_h.defined() &&
         !l.zone_c.defined() && l.zone_h_p == 0.0 && l.zone_c_p == 0.0;
}

template <typename T>
Cell<T> cell_of(const Layer& l) {
  return {l.kind,
          l.hidden,
          pointer<T>(l.peephole),
          pointer<T>(l.ln_hh_weight),
          pointer<T>(l.ln_hh_bias),
          pointer<T>(l.ln_c_weight),
          pointer<T>(l.ln_c_bias)};
}

template <typename T>
Zone<T> zone_of(const Tensor& mask, double p, int64_t width) {
  return {pointer<T>(mask), static_cast<T>(p), width};
}

// A (rows, cols) row-major view of memory inside one of this file's buffers, made without the
// dispatcher: select/narrow cost 1-2 us each, as much as a whole step's gate pass at B=1.
template <typename T>
Tensor rows_of(const T* data, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, options);
}

// A buffer (from the pool) whose rows of finished sequences must read as zero: zeroed only
// where some sequence ends early.
Tensor buffer(at::IntArrayRef shape, bool ragged, const at::TensorOptions& options) {
  return pooled(shape, options.dtype().toScalarType(), ragged);
}

}  // namespace

Forward recurrence(const Tensor& xp_in, const Tensor& h0_in, const Tensor& c0_in,
                   const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                   const std::optional<Tensor>& peephole, const std::optional<Tensor>& ln_hh_weight,
                   const std::optional<Tensor>& ln_hh_bias,
                   const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
                   c10::string_view kind, const std::optional<Tensor>& recurrent,
                   const std::optional<Tensor>& zone_h, const std::optional<Tensor>& zone_c,
                   double zone_h_p, double zone_c_p, at::IntArrayRef batch_sizes, bool training) {
  const Layer l = make_layer(xp_in, h0_in, c0_in, w_hh, w_hr, peephole, ln_hh_weight, ln_hh_bias,
                             ln_c_weight, ln_c_bias, std::string_view(kind.data(), kind.size()),
                             recurrent, zone_h, zone_c, zone_h_p, zone_c_p);
  const Tensor xp = xp_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const int64_t steps = l.steps, batch = l.batch, hidden = l.hidden, proj = l.proj;
  const int64_t rows = l.blocks * hidden;
  const bool layernorm = l.kind == Kind::kLayerNorm, projected = l.w_hr.defined();
  const std::vector<int64_t> sizes = running(batch_sizes, steps, batch);
  const bool ragged = !batch_sizes.empty();
  const auto options = xp.options();
  const bool zoned_c = l.zone_c.defined() || l.zone_c_p != 0.0;

  // Training keeps every step's values (T of each), inference one slot of each; the cell
  // state alternates two slots in inference (a finished sequence's row is never written
  // again, so its last slot still holds its final state).
  const int64_t kept = training ? steps : 1;
  Tensor gates = buffer({kept, batch, rows}, ragged && training, options);
  Tensor output = buffer({steps, batch, proj}, ragged, options);
  Tensor cells = buffer({training ? steps : 2, batch, hidden}, ragged && training, options);
  const auto slot = [training](int64_t t) { return training ? t : t % 2; };
  // c' before zoneout: its own buffer under zoneout of c, else the state itself
  Tensor cells_new = zoned_c ? buffer({kept, batch, hidden}, ragged && training, options)
                             : at::empty({0}, options);
  Tensor hhat = layernorm ? buffer({kept, batch, rows}, ragged && training, options)
                          : at::empty({0}, options);
  Tensor chat = layernorm ? buffer({kept, batch, hidden}, ragged && training, options)
                          : at::empty({0}, options);
  Tensor rstd =
      layernorm ? buffer({kept, batch, 2}, ragged && training, options) : at::empty({0}, options);
  Tensor m = at::empty({batch, hidden}, options);  // o tanh(y), before the projection
  Tensor a = l.recurrent.defined() ? at::empty({batch, proj}, options) : Tensor();
  Tensor rec = layernorm ? at::empty({batch, rows}, options) : Tensor();
  const Product recurrent_product = product(l.w_hh.t(), batch, steps);  // a W_hh^T
  const std::optional<Product> projection =
      projected ? std::optional<Product>(product(l.w_hr.t(), batch, steps)) : std::nullopt;

  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "lstmkit::recurrence", [&] {
    using T = scalar_t;
    const Cell<T> cell = cell_of<T>(l);
    const Zone<T> zh = zone_of<T>(l.zone_h, l.zone_h_p, proj);
    const Zone<T> zc = zone_of<T>(l.zone_c, l.zone_c_p, hidden);
    T* const gates_p = gates.data_ptr<T>();
    T* const output_p = output.data_ptr<T>();
    T* const cells_p = cells.data_ptr<T>();
    T* const m_p = m.data_ptr<T>();
    const T* const xp_p = xp.const_data_ptr<T>();
    const T* const h0_p = h0.const_data_ptr<T>();
    const T* const c0_p = c0.const_data_ptr<T>();
    const T* const r_p = pointer<T>(l.recurrent);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t n = sizes[t];
      if (n == 0) break;
      const int64_t k = training ? t : 0;  // the slot of step t's kept values
      T* g = gates_p + k * batch * rows;
      const T* h_prev = t == 0 ? h0_p : output_p + (t - 1) * batch * proj;
      const T* source = h_prev;  // a = h_{t-1} r
      if (r_p != nullptr) {
        T* a_p = a.data_ptr<T>();
        for (int64_t e = 0; e < n * proj; ++e) a_p[e] = h_prev[e] * r_p[e];
        source = a_p;
      }
      Tensor g_rows = rows_of(g, n, rows, options);
      const Tensor xp_rows = rows_of(xp_p + t * batch * rows, n, rows, options);
      if (layernorm) {
        Tensor rec_rows = rows_of(rec.data_ptr<T>(), n, rows, options);
        recurrent_product(rec_rows, rows_of(source, n, proj, options));
        T* hh = hhat.data_ptr<T>() + k * batch * rows;
        T* sd = rstd.data_ptr<T>() + k * batch * 2;
        const T* rec_p = rec.const_data_ptr<T>();
        for (int64_t b = 0; b < n; ++b) {
          T* hb = hh + b * rows;
          sd[2 * b] = normalise(rec_p + b * rows, hb, rows);
          const T* xb = xp_p + (t * batch + b) * rows;
          T* gb = g + b * rows;
          for (int64_t j = 0; j < rows; ++j) {
            gb[j] = xb[j] + cell.ln_hh_weight[j] * hb[j] + cell.ln_hh_bias[j];
          }
        }
      } else {
        recurrent_product(g_rows, rows_of(source, n, proj, options), &xp_rows);
      }
      const T* c_prev = t == 0 ? c0_p : cells_p + slot(t - 1) * batch * hidden;
      T* c_state = cells_p + slot(t) * batch * hidden;
      T* c_new = zoned_c ? cells_new.data_ptr<T>() + k * batch * hidden : c_state;
      T* h_t = output_p + t * batch * proj;
      T* m_rows = projected ? m_p : h_t;  // without a projection m is h' itself (P = H)
      T* const chat_p = layernorm ? chat.data_ptr<T>() + k * batch * hidden : nullptr;
      T* const rstd_p = layernorm ? rstd.data_ptr<T>() + k * batch * 2 : nullptr;
      over_rows(n, rows, false, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          T* ch = layernorm ? chat_p + b * hidden : nullptr;
          const T sd = gates_forward_row(cell, g + b * rows, c_prev + b * hidden,
                                         c_new + b * hidden, m_rows + b * hidden, ch);
          if (layernorm) rstd_p[2 * b + 1] = sd;
        }
      });
      if (projected) {
        Tensor h_rows = rows_of(h_t, n, proj, options);
        (*projection)(h_rows, rows_of(m_p, n, hidden, options));  // (n, P)
      }
      if (zh.on()) zh.apply(h_t, h_prev, t, batch, n);
      if (zoned_c) {
        std::memcpy(c_state, c_new, n * hidden * sizeof(T));
        zc.apply(c_state, c_prev, t, batch, n);
      }
    }
  });

  // Each sequence's state after its last step (its initial state if it has none).
  Tensor h_n = at::empty({batch, proj}, options);
  Tensor c_n = at::empty({batch, hidden}, options);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "lstmkit::recurrence", [&] {
    const auto copy_row = [b_size = batch](Tensor& to, int64_t b, const Tensor& from, int64_t t,
                                           int64_t width) {
      std::memcpy(to.data_ptr<scalar_t>() + b * width,
                  from.const_data_ptr<scalar_t>() + (t * b_size + b) * width,
                  width * sizeof(scalar_t));
    };
    for (int64_t b = 0, last = steps; b < batch; ++b) {
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
  if (!training) {  // an operator's outputs never alias each other: one empty tensor each
    const auto none = [&options] { return at::empty({0}, options); };
    return {output, h_n, c_n, none(), none(), none(), none(), none(), none()};
  }
  return {output, h_n, c_n, gates, cells, cells_new, hhat, chat, rstd};
}

Backward recurrence_backward(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_h_n,
    const std::optional<Tensor>& grad_c_n, const Tensor& h0_in, const Tensor& c0_in,
    const Tensor& w_hh, const std::optional<Tensor>& w_hr, const std::optional<Tensor>& peephole,
    const std::optional<Tensor>& ln_hh_weight, const std::optional<Tensor>& ln_hh_bias,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
    c10::string_view kind, const std::optional<Tensor>& recurrent,
    const std::optional<Tensor>& zone_h, const std::optional<Tensor>& zone_c, double zone_h_p,
    double zone_c_p, const Tensor& output, const Tensor& gates_in, const Tensor& cells_in,
    const Tensor& cells_new_in, const Tensor& hhat_in, const Tensor& chat_in, const Tensor& rstd_in,
    at::IntArrayRef batch_sizes, bool weight_hh_grad) {
  const Layer l = make_layer(gates_in, h0_in, c0_in, w_hh, w_hr, peephole, ln_hh_weight, ln_hh_bias,
                             ln_c_weight, ln_c_bias, std::string_view(kind.data(), kind.size()),
                             recurrent, zone_h, zone_c, zone_h_p, zone_c_p);
  const Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const int64_t steps = l.steps, batch = l.batch, hidden = l.hidden, proj = l.proj;
  const int64_t rows = l.blocks * hidden;
  const bool layernorm = l.kind == Kind::kLayerNorm, projected = l.w_hr.defined();
  const bool zoned_c = l.zone_c.defined() || l.zone_c_p != 0.0;
  TORCH_CHECK(cells_in.sizes() == at::IntArrayRef({steps, batch, hidden}) &&
                  output.sizes() == at::IntArrayRef({steps, batch, proj}) &&
                  (!zoned_c || cells_new_in.sizes() == cells_in.sizes()) &&
                  (!layernorm ||
                   (hhat_in.sizes() == gates_in.sizes() && chat_in.sizes() == cells_in.sizes() &&
                    rstd_in.sizes() == at::IntArrayRef({steps, batch, 2}))),
              "lstmkit::recurrence_backward needs the saved values of a training forward");
  const std::vector<int64_t> sizes = running(batch_sizes, steps, batch);
  const bool ragged = !batch_sizes.empty();
  const auto options = gates_in.options();
  const Tensor gates = gates_in.contiguous(), cells = cells_in.contiguous();
  const Tensor cells_new = zoned_c ? cells_new_in.contiguous() : cells;
  const Tensor hhat = layernorm ? hhat_in.contiguous() : Tensor();
  const Tensor chat = layernorm ? chat_in.contiguous() : Tensor();
  const Tensor rstd = layernorm ? rstd_in.contiguous() : Tensor();

  // The state gradients flowing back in time start as those of (h_n, c_n): a finished
  // sequence's rows wait untouched until the step where it ended.
  Tensor dh =
      grad_h_n.has_value() ? grad_h_n->contiguous().clone() : at::zeros({batch, proj}, options);
  Tensor dc =
      grad_c_n.has_value() ? grad_c_n->contiguous().clone() : at::zeros({batch, hidden}, options);
  const Tensor dout = grad_output.has_value() ? grad_output->contiguous() : Tensor();
  Tensor dz = buffer({steps, batch, rows}, ragged, options);  // dL/dxp
  // layernorm: the gradient of a W_hh^T, LN_hh's backward of dz
  Tensor drec = layernorm ? buffer({steps, batch, rows}, ragged, options) : dz;
  // With a projection: every step's dL/dh' and m, for dW_hr after the loop.
  Tensor dh_seq = projected ? buffer({steps, batch, proj}, ragged, options) : Tensor();
  Tensor m_seq = projected ? buffer({steps, batch, hidden}, ragged, options) : Tensor();
  Tensor dgain_c = layernorm ? at::zeros({hidden}, options) : at::empty({0}, options);
  Tensor dln_hh_weight, dln_hh_bias;  // LN_hh's gain and shift gradients
  Tensor dshift_c = layernorm ? at::zeros({hidden}, options) : at::empty({0}, options);

  if (by_rows(l, gates.scalar_type())) {
    if (layernorm) {
      dln_hh_weight = at::zeros({rows}, options);
      dln_hh_bias = at::zeros({rows}, options);
    }
    const LayerNormKept ln{l.ln_hh_weight, l.ln_c_weight, l.ln_c_bias, hhat,    chat,    rstd,
                           drec,           dln_hh_weight, dln_hh_bias, dgain_c, dshift_c};
    backward_kept(dout, dh, dc, c0, l.w_hh, l.w_hr, l.peephole, ln,
                  std::string_view(kind.data(), kind.size()), gates, cells, batch_sizes, dz, dh_seq,
                  m_seq);
  } else {
    Tensor dm = at::empty({batch, hidden}, options);
    Tensor keep_h = at::empty({batch, proj}, options);
    Tensor keep_c = at::empty({batch, hidden}, options);
    Tensor work = at::empty({hidden}, options);
    const Product recurrent_product = product(l.w_hh, batch, steps);  // dz W_hh
    const std::optional<Product> projection =
        projected ? std::optional<Product>(product(l.w_hr, batch, steps)) : std::nullopt;
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstmkit::recurrence_backward", [&] {
      using T = scalar_t;
      const Cell<T> cell = cell_of<T>(l);
      const Zone<T> zh = zone_of<T>(l.zone_h, l.zone_h_p, proj);
      const Zone<T> zc = zone_of<T>(l.zone_c, l.zone_c_p, hidden);
      T* const dh_p = dh.data_ptr<T>();
      T* const dc_p = dc.data_ptr<T>();
      T* const dm_p = dm.data_ptr<T>();
      T* const dz_p = dz.data_ptr<T>();
      T* const drec_p = drec.data_ptr<T>();
      T* const keep_h_p = keep_h.data_ptr<T>();
      T* const keep_c_p = keep_c.data_ptr<T>();
      const T* const dout_p = pointer<T>(dout);
      const T* const gates_p = gates.const_data_ptr<T>();
      const T* const cells_p = cells.const_data_ptr<T>();
      const T* const new_p = cells_new.const_data_ptr<T>();
      const T* const c0_p = c0.const_data_ptr<T>();
      const T* const r_p = pointer<T>(l.recurrent);
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t n = sizes[t];
        if (n == 0) continue;
        if (dout_p != nullptr) {  // dh: everything that reaches h_t, (n, P)
          const T* d = dout_p + t * batch * proj;
          for (int64_t e = 0; e < n * proj; ++e) dh_p[e] += d[e];
        }
        if (zh.on()) zh.split(dh_p, keep_h_p, t, batch, n);  // dh becomes dL/dh'
        if (zc.on()) zc.split(dc_p, keep_c_p, t, batch, n);  // dc becomes dL/dc' (so far)
        Tensor dh_rows = rows_of(dh_p, n, proj, options);
        const T* dm_t = dh_p;
        T* m_t = nullptr;
        if (projected) {
          std::memcpy(dh_seq.data_ptr<T>() + t * batch * proj, dh_p, n * proj * sizeof(T));
          Tensor dm_rows = rows_of(dm_p, n, hidden, options);
          (*projection)(dm_rows, dh_rows);  // (n, H)
          dm_t = dm_p;
          m_t = m_seq.data_ptr<T>() + t * batch * hidden;
        }
        const T* c_prev = t == 0 ? c0_p : cells_p + (t - 1) * batch * hidden;
        const T* const chat_p = layernorm ? chat.const_data_ptr<T>() : nullptr;
        const T* const rstd_p = layernorm ? rstd.const_data_ptr<T>() : nullptr;
        T* const dgain_p = layernorm ? dgain_c.data_ptr<T>() : nullptr;
        T* const dshift_p = layernorm ? dshift_c.data_ptr<T>() : nullptr;
        // layernorm's rows add to one gain and shift gradient, and share `work`: one thread
        over_rows(n, rows, layernorm, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            const int64_t row = (t * batch + b) * hidden;
            gates_backward_row(cell, gates_p + (t * batch + b) * rows, c_prev + b * hidden,
                               new_p + row, layernorm ? chat_p + row : nullptr,
                               layernorm ? rstd_p[(t * batch + b) * 2 + 1] : T(1),
                               dm_t + b * hidden, dc_p + b * hidden, dz_p + (t * batch + b) * rows,
                               m_t == nullptr ? nullptr : m_t + b * hidden, dgain_p, dshift_p,
                               work.data_ptr<T>());
          }
        });
        if (zc.on()) {
          for (int64_t e = 0; e < n * hidden; ++e) dc_p[e] += keep_c_p[e];
        }
        T* dr = drec_p + t * batch * rows;
        if (layernorm) {  // drec = LN_hh's backward of dz (gain g_hh)
          const T* dzt = dz_p + t * batch * rows;
          const T* hh = hhat.const_data_ptr<T>() + t * batch * rows;
          const T* sd = rstd.const_data_ptr<T>() + t * batch * 2;
          for (int64_t b = 0; b < n; ++b) {
            for (int64_t j = 0; j < rows; ++j) {
              dr[b * rows + j] = dzt[b * rows + j] * cell.ln_hh_weight[j];
            }
            normalise_backward(dr + b * rows, hh + b * rows, sd[2 * b], rows);
          }
        }
        recurrent_product(dh_rows, rows_of(dr, n, rows, options));  // dL/da, (n, P)
        if (r_p != nullptr) {
          for (int64_t e = 0; e < n * proj; ++e) dh_p[e] *= r_p[e];
        }
        if (zh.on()) {
          for (int64_t e = 0; e < n * proj; ++e) dh_p[e] += keep_h_p[e];
        }
      }
    });
  }

  // a_{t-1} = h_{t-1} r of step t is (h0 at t = 0, output[t - 1] after) times r.
  const Tensor flat = drec.view({steps * batch, rows});
  const Tensor previous = steps > 1 ? output.narrow(0, 0, steps - 1) : Tensor();
  Tensor dw_hh;
  if (!weight_hh_grad) {  // the caller's (weight_gradients)
    dw_hh = at::empty({0}, options);
  } else if (l.recurrent.defined()) {
    dw_hh = at::mm(drec[0].t(), h0 * l.recurrent);  // (GH, P)
    if (steps > 1) {
      dw_hh.addmm_(flat.narrow(0, batch, (steps - 1) * batch).t(),
                   (previous * l.recurrent).view({(steps - 1) * batch, proj}));
    }
  } else if (drec.scalar_type() == at::kFloat) {  // on the product kernel, as the caller's
    dw_hh = std::get<1>(weight_gradients(drec, std::nullopt, h0, output));
  } else {
    dw_hh = at::mm(drec[0].t(), h0);
    if (steps > 1) {
      dw_hh.addmm_(flat.narrow(0, batch, (steps - 1) * batch).t(),
                   previous.reshape({(steps - 1) * batch, proj}));
    }
  }
  const auto none = [&options] { return at::empty({0}, options); };
  Tensor dw_hr = projected ? at::mm(dh_seq.view({steps * batch, proj}).t(),
                                    m_seq.view({steps * batch, hidden}))
                           : none();
  Tensor dpeephole = none();
  if (l.kind == Kind::kPeephole) {  // p_i, p_f see c_{t-1}; p_o sees c'
    const Tensor c_before =
        steps > 1 ? at::cat({c0.unsqueeze(0), cells.narrow(0, 0, steps - 1)}) : c0.unsqueeze(0);
    const auto block = [&](int64_t k) { return dz.narrow(2, k * hidden, hidden); };
    dpeephole = at::cat({(block(0) * c_before).sum({0, 1}), (block(1) * c_before).sum({0, 1}),
                         (block(3) * cells_new).sum({0, 1})});
  }
  if (!layernorm) {
    dln_hh_weight = none();
    dln_hh_bias = none();
  } else if (!dln_hh_weight.defined()) {  // (the rows kernel added them up in its loop)
    dln_hh_weight = (dz * hhat).sum({0, 1});
    dln_hh_bias = dz.sum({0, 1});
  }
  return {dz, dh, dc, dw_hh, dw_hr, dpeephole, dln_hh_weight, dln_hh_bias, dgain_c, dshift_c};
}

}  // namespace lstmkit
