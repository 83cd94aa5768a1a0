// The backward of training_forward's layer over rows split between threads
// (lstmkit::recurrence_backward calls it for the float32 cells without masks), and layer norm's
// backward in place for layernorm training's input half (lstmkit::layer_norm_backward_).

#include <ATen/Parallel.h>

#include <cstring>
#include <string_view>
#include <vector>

#include "cell.h"
#include "layer.h"
#include "ops.h"
#include "panels.h"

namespace lstmkit {

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
  const Tiling layout = tiling();
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
          product(&projection, 1, n, h_panels, nullptr, dm_rows.data(), layout);
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
            const float* hh = hhat_p + at_t * rows;
            affine_backward(dz_p + at_t * rows, hh, cell.ln_hh_weight, dgain_hh.data(),
                            dshift_hh.data(), dr, rows);
            normalise_backward(dr, hh, rstd_p[2 * at_t], rows);
            dz_read[r] = dr;
          }
        }
        const Operand recurrent{dz_read.data(), packed_hh.const_data_ptr<float>(), rows};
        product(&recurrent, 1, n, p_panels, nullptr, dh_rows.data(), layout);
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
