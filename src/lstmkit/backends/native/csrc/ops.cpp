// The native backend's operator schemas and their CPU kernels: torch.ops.lstmkit.*.

#include "ops.h"

#include <torch/library.h>

#include "products.h"

namespace lstmkit {

TORCH_LIBRARY(lstmkit, m) {
  m.def(
      "recurrence(Tensor xp, Tensor h0, Tensor c0, Tensor weight_hh, Tensor? weight_hr, "
      "Tensor? weight_ch, Tensor? ln_hh_weight, Tensor? ln_hh_bias, Tensor? ln_c_weight, "
      "Tensor? ln_c_bias, str kind, Tensor? recurrent, Tensor? zone_h, Tensor? zone_c, "
      "float zone_h_p, float zone_c_p, int[] batch_sizes, bool training) -> (Tensor output, "
      "Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor cells_new, Tensor hhat, "
      "Tensor chat, Tensor rstd)");
  m.def(
      "recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor h0, "
      "Tensor c0, Tensor weight_hh, Tensor? weight_hr, Tensor? weight_ch, Tensor? ln_hh_weight, "
      "Tensor? ln_hh_bias, Tensor? ln_c_weight, Tensor? ln_c_bias, str kind, Tensor? recurrent, "
      "Tensor? zone_h, Tensor? zone_c, float zone_h_p, float zone_c_p, Tensor output, "
      "Tensor gates, Tensor cells, Tensor cells_new, Tensor hhat, Tensor chat, Tensor rstd, "
      "int[] batch_sizes, bool weight_hh_grad=True) -> (Tensor dxp, Tensor dh0, Tensor dc0, "
      "Tensor dweight_hh, "
      "Tensor dweight_hr, Tensor dweight_ch, Tensor dln_hh_weight, Tensor dln_hh_bias, "
      "Tensor dln_c_weight, Tensor dln_c_bias)");
  m.def(
      "inference(Tensor x, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, Tensor? weight_ch, "
      "Tensor? ln_ih_weight, Tensor? ln_ih_bias, Tensor? ln_hh_weight, Tensor? ln_hh_bias, "
      "Tensor? ln_c_weight, Tensor? ln_c_bias, str kind, float zone_h_p, float zone_c_p, "
      "int[] batch_sizes) -> (Tensor output, Tensor h_n, Tensor c_n)");
  m.def(
      "inference_stack(Tensor x, Tensor? h0, Tensor? c0, Tensor?[] params, str kind, "
      "float zone_h_p, float zone_c_p, int directions=1) -> (Tensor output, Tensor h_n, "
      "Tensor c_n)");
  m.def(
      "training_forward(Tensor x, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, Tensor? weight_ch, "
      "Tensor? ln_ih_weight, Tensor? ln_ih_bias, Tensor? ln_hh_weight, Tensor? ln_hh_bias, "
      "Tensor? ln_c_weight, Tensor? ln_c_bias, str kind, int[] batch_sizes) -> (Tensor output, "
      "Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor hhat, Tensor chat, "
      "Tensor rstd, Tensor products_ih, Tensor stats_ih)");
  m.def("linear(Tensor a, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "weight_gradients(Tensor dz, Tensor? x, Tensor? h0, Tensor? output) -> (Tensor dweight_ih, "
      "Tensor dweight_hh)");
  m.def(
      "layer_norm_backward_(Tensor(a!) grad, Tensor input, Tensor stats, Tensor weight) -> "
      "Tensor");
  m.def(
      "product_route(ScalarType dtype, int rows, int in_features, int out_features, "
      "bool transposed, int uses) "
      "-> str");
}

TORCH_LIBRARY_IMPL(lstmkit, CPU, m) {
  m.impl("recurrence", &recurrence);
  m.impl("recurrence_backward", &recurrence_backward);
  m.impl("inference", &inference);
  m.impl("inference_stack", &inference_stack);
  m.impl("training_forward", &training_forward);
  m.impl("linear", &linear);
  m.impl("weight_gradients", &weight_gradients);
  m.impl("layer_norm_backward_", &layer_norm_backward_);
}

TORCH_LIBRARY_IMPL(lstmkit, CompositeExplicitAutograd, m) {
  m.impl("product_route", &product_route);
}

}  // namespace lstmkit
