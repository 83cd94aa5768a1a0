// The operators of the native backend, as C++ functions: registered in ops.cpp, defined in
// recurrence.cpp (the recurrence forward and backward, every dtype, training and inference),
// inference.cpp (float32 inference and training's forward, the whole layer in one kernel),
// backward_rows.cpp (that forward's backward; layer_norm_backward_) and panels.cpp (linear,
// weight_gradients).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace lstmkit {

using at::Tensor;

using Forward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Backward =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Forward recurrence(const Tensor& xp_in, const Tensor& h0_in, const Tensor& c0_in,
                   const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                   const std::optional<Tensor>& peephole, const std::optional<Tensor>& ln_hh_weight,
                   const std::optional<Tensor>& ln_hh_bias,
                   const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
                   c10::string_view kind, const std::optional<Tensor>& recurrent,
                   const std::optional<Tensor>& zone_h, const std::optional<Tensor>& zone_c,
                   double zone_h_p, double zone_c_p, at::IntArrayRef batch_sizes, bool training);

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
    at::IntArrayRef batch_sizes, bool weight_hh_grad);

std::tuple<Tensor, Tensor, Tensor> inference(
    const Tensor& x, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& peephole,
    const std::optional<Tensor>& ln_ih_weight, const std::optional<Tensor>& ln_ih_bias,
    const std::optional<Tensor>& ln_hh_weight, const std::optional<Tensor>& ln_hh_bias,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
    c10::string_view kind_name, double zone_h_p, double zone_c_p, at::IntArrayRef batch_sizes);

// inference of a stack of layers of `directions` directions (1, or 2: bidirectional, the
// second reversed in time, their outputs side by side), each layer on the output of the one
// below, layer-direction k from its state h0[k], c0[k] ((L D, B, P) and (L D, B, H); zeros where
// neither is given), `params` holding each layer-direction's twelve parameters in inference's
// order: one operator call for the whole stack (streaming calls it once a step). (output of the
// top layer (T, B, D P), h_n, c_n), the states (L D, B, *).
std::tuple<Tensor, Tensor, Tensor> inference_stack(const Tensor& x, const std::optional<Tensor>& h0,
                                                   const std::optional<Tensor>& c0,
                                                   const c10::List<std::optional<Tensor>>& params,
                                                   c10::string_view kind_name, double zone_h_p,
                                                   double zone_c_p, int64_t directions);

// (output, h_n, c_n, gates, cells, hhat, chat, rstd, products_ih, stats_ih): see
// training_forward.
using TrainingForward =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The training forward of a float32 layer-direction with no mask, from its input: the inference
// kernel computing every step's input half itself and keeping every step's activated gates and
// c_t; for layernorm also, as lstmkit::recurrence keeps them, hhat (LN_hh's normalised input,
// (T, B, 4H)), chat (LN_c's, (T, B, H)) and rstd ((T, B, 2), the 1 / std of both), and for the
// input's layer norm products_ih = x W_ih^T (T, B, 4H) and stats_ih (2, T, B, 1), its mean and
// 1 / std (empty tensors for the other cells). The backward is recurrence_backward's (from the
// kept values) and, from its dL/dxp, the input half's.
TrainingForward training_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& peephole,
    const std::optional<Tensor>& ln_ih_weight, const std::optional<Tensor>& ln_ih_bias,
    const std::optional<Tensor>& ln_hh_weight, const std::optional<Tensor>& ln_hh_bias,
    const std::optional<Tensor>& ln_c_weight, const std::optional<Tensor>& ln_c_bias,
    c10::string_view kind, at::IntArrayRef batch_sizes);

// What backward_kept reads and writes for the layernorm cell (undefined tensors for the
// others): LN_hh's gain, LN_c's gain and shift; the forward's kept hhat, chat and rstd; drec
// (T, B, 4H), filled with LN_hh's backward of dz (zero rows where finished must be zero
// already); the gradients of LN_hh's gain and shift (4H) and of LN_c's (H), added to.
struct LayerNormKept {
  Tensor hh_weight, c_weight, c_bias, hhat, chat, rstd, drec, dgain_hh, dshift_hh, dgain_c,
      dshift_c;
};

// The backward of what training_forward ran, over rows split between threads as in the forward:
// from dh, dc (the gradients of h_n, c_n, replaced by those of h0, c0) and grad_output, fills
// dz (T, B, GH: dL/dxp, zero rows where finished must be zero already) and, with a projection,
// dh_seq (every step's dL/dh') and m_seq (every step's m), as recurrence_backward's loop does.
// Tensors contiguous; grad_output, w_hr and peephole undefined where absent.
void backward_kept(const Tensor& grad_output, Tensor& dh, Tensor& dc, const Tensor& c0,
                   const Tensor& w_hh, const Tensor& w_hr, const Tensor& peephole,
                   const LayerNormKept& ln, std::string_view kind, const Tensor& gates,
                   const Tensor& cells, at::IntArrayRef batch_sizes, Tensor& dz, Tensor& dh_seq,
                   Tensor& m_seq);

// a (..., K) @ weight^T + bias, float32: weight (N, K), row-major or a (K, N) tensor's .t(),
// bias (N) or none; on the inference kernel's packed products, blocks of a's rows shared
// between threads. The input half of training and its gradient by the input.
Tensor linear(const Tensor& a, const Tensor& weight, const std::optional<Tensor>& bias);

// The weight gradients of a layer's two products from dz = dL/dz (T, B, G), when the recurrent
// product's input is the layer's output (no recurrent mask): dz^T x (G, I) where x is given,
// and dz^T [h0; output[0 .. T - 2]] (G, P) where h0 and output are (else empty tensors). Both
// share each block of dz^T, transposed once.
std::tuple<Tensor, Tensor> weight_gradients(const Tensor& dz, const std::optional<Tensor>& x,
                                            const std::optional<Tensor>& h0,
                                            const std::optional<Tensor>& output);

// Layer norm's backward in place, float32: grad (..., G), the gradient of gain LN(input) + shift,
// becomes that of `input` (same shape), from the input, its mean and 1 / std (stats: (2, ...),
// the means then the 1 / std, one per row) and the gain `weight` (G). Returns the gain's
// gradient. Training's input half for layernorm (its input x W_ih^T), without the new (T, B, 4H)
// buffer that ATen's native_layer_norm_backward allocates.
Tensor layer_norm_backward_(Tensor& grad, const Tensor& input, const Tensor& stats,
                            const Tensor& weight);

}  // namespace lstmkit
