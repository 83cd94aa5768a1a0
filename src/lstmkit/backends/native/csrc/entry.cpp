// The library's Python module, lstmkit_native: importing it registers the operators (ops.cpp)
// and gives Python one function, infer_whole, for lstmkit.LSTM.forward's commonest inference
// call: a batch of whole sequences from the zero state or a given one through a unidirectional
// stack, nothing to differentiate, no masks to draw (and for step's). Between other work (a
// server's requests, a benchmark's turns) the caches hold another program's data, and the Python
// path from forward to lstmkit::inference_stack then costs 100-200 us, as much as the operator
// itself at T = 200, H = 128; here the same questions read a few fields of each tensor. Wherever an
// answer is not the plain one it returns None and forward takes its Python path, which asks them
// again and gives the same numbers (it ends in the same operator) or the error. It also gives
// the training buffers' pool (pool.h) its limit and counts.

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <tuple>

#include "pool.h"

namespace lstmkit {
namespace {

namespace py = pybind11;
using at::Tensor;

using Stack = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                 const std::optional<Tensor>&,
                                                 const c10::List<std::optional<Tensor>>&,
                                                 c10::string_view, double, double, int64_t);

// A tensor that the operator may take as it is: a torch.Tensor or nn.Parameter (no subclass,
// which may have a __torch_function__ or __torch_dispatch__ of its own), on the CPU, and with
// nothing for autograd to record (backward or forward mode).
bool plain(PyObject* object, bool grad) {
  if (!THPVariable_CheckExact(object)) return false;
  const Tensor& tensor = THPVariable_Unpack(object);
  if (tensor.key_set().has(c10::DispatchKey::Python) || !tensor.is_cpu()) return false;
  return !(grad && tensor.requires_grad()) && !tensor._fw_grad(0).defined();
}

// No torch.func transform, torch.jit.trace, torch.autocast, or Python function or dispatch
// mode around the call: each of them wants the Python path's answer.
bool plain_context() {
  return !c10::impl::tls_is_dispatch_key_included(
             c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !at::impl::torch_function_mode_enabled() && !torch::jit::tracer::isTracing() &&
         !at::autocast::is_autocast_enabled(at::kCPU) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

// One state of the stack, h0 or c0: (layers, batch, size), float32, plain.
bool state_fits(PyObject* state, bool grad, int64_t layers, int64_t batch, int64_t size) {
  if (!plain(state, grad)) return false;
  const Tensor& tensor = THPVariable_Unpack(state);
  return tensor.dim() == 3 && tensor.size(0) == layers && tensor.size(1) == batch &&
         tensor.size(2) == size && tensor.scalar_type() == at::kFloat;
}

// forward(input, hx) of a unidirectional stack drawing no masks, or step(input, hx) with
// one_step, as (output, h_n, c_n); or None. input must be (T, B, input_size), (B, T,
// input_size) with batch_first, or (B, input_size) with one_step, T >= 1, float32 like
// weight_ih_l0; hx None or a tuple (h0, c0) of (L, B, out_size) and (L, B, hidden_size).
// parameters is the module's _parameters; names its parameter names as built, a list per
// layer; slots the operator's parameter names per layer (lstmkit.backends.native.LAYER_NAMES).
// Every name in names must be registered (a parametrization takes its parameter out) and no
// other slot filled.
py::object infer_whole(py::handle input, py::handle hx, py::dict parameters, py::list names,
                       py::tuple slots, int64_t input_size, int64_t hidden_size, int64_t out_size,
                       bool batch_first, bool one_step, const std::string& kind, double zone_h_p,
                       double zone_c_p) {
  HANDLE_TH_ERRORS
  const bool grad = at::GradMode::is_enabled();
  if (!plain_context() || !plain(input.ptr(), grad)) return py::none();
  const Tensor& x = THPVariable_Unpack(input.ptr());
  if (x.dim() != (one_step ? 2 : 3) || x.size(-1) != input_size || x.scalar_type() != at::kFloat ||
      (!one_step && x.size(batch_first ? 1 : 0) == 0)) {
    return py::none();
  }
  const int64_t layers = static_cast<int64_t>(names.size());
  const int64_t batch = x.size(one_step || !batch_first ? -2 : 0);
  std::optional<Tensor> h0, c0;
  if (!hx.is_none()) {
    if (!PyTuple_Check(hx.ptr()) || PyTuple_GET_SIZE(hx.ptr()) != 2) return py::none();
    PyObject* h = PyTuple_GET_ITEM(hx.ptr(), 0);
    PyObject* c = PyTuple_GET_ITEM(hx.ptr(), 1);
    if (!state_fits(h, grad, layers, batch, out_size) ||
        !state_fits(c, grad, layers, batch, hidden_size)) {
      return py::none();
    }
    h0 = THPVariable_Unpack(h);
    c0 = THPVariable_Unpack(c);
  }
  c10::List<std::optional<Tensor>> weights;
  weights.reserve(layers * slots.size());
  for (int64_t layer = 0; layer < layers; ++layer) {
    const py::list built = names[layer].cast<py::list>();
    for (const py::handle name : built) {
      if (PyDict_Contains(parameters.ptr(), name.ptr()) != 1) return py::none();
    }
    size_t filled = 0;
    const std::string suffix = "_l" + std::to_string(layer);
    for (const py::handle slot : slots) {
      const std::string name = slot.cast<std::string>() + suffix;
      PyObject* value = PyDict_GetItemString(parameters.ptr(), name.c_str());
      if (value == nullptr || value == Py_None) {
        weights.push_back(std::nullopt);
        continue;
      }
      if (!plain(value, grad)) return py::none();
      weights.push_back(THPVariable_Unpack(value));
      ++filled;
    }
    if (filled != built.size()) return py::none();
  }
  const std::optional<Tensor>& weight_ih = weights.get(0);
  if (!weight_ih.has_value() || weight_ih->scalar_type() != at::kFloat) return py::none();
  static const auto stack =
      c10::Dispatcher::singleton().findSchemaOrThrow("lstmkit::inference_stack", "").typed<Stack>();
  const Tensor steps_first = one_step ? x.unsqueeze(0) : batch_first ? x.transpose(0, 1) : x;
  Tensor output, h_n, c_n;
  {
    py::gil_scoped_release others_run;  // as torch.ops calls do: other Python threads go on
    std::tie(output, h_n, c_n) =
        stack.call(steps_first, h0, c0, weights, kind, zone_h_p, zone_c_p, 1);
  }
  if (one_step) {
    output = output.select(0, 0);
  } else if (batch_first) {
    output = output.transpose(0, 1);
  }
  return py::make_tuple(output, h_n, c_n);
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace
}  // namespace lstmkit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("infer_whole", &lstmkit::infer_whole);
  module.def("pool_limit", py::overload_cast<int64_t>(&lstmkit::pool_limit));
  module.def("pool_limit", py::overload_cast<>(&lstmkit::pool_limit));
  module.def("pool_kept", &lstmkit::pool_kept);
  module.def("pool_in_use", &lstmkit::pool_in_use);
}
