// ---- The per-step products ----------------------------------------------------------------
// A step's products (a W_hh^T, m W_hr^T; backward dz W_hh, dh' W_hr) take one of three routes:
// ATen (addmm: MKL here); oneDNN's linear with the weight reordered into its blocked layout
// (torch's own mkldnn::_linear_pointwise, float32 only); or, for a few rows, the loop below
// over a row-major copy of the weight. Which is fastest depends on the CPU and the sizes
// (oneDNN won by 1.3-2x at 64 x 512 x 2048 on AVX-512 EPYCs; MKL's small-matrix path costs
// 7-10 us at B = 1). The first layer of a given shape and dtype in a process times every
// route, and the weight's preparation, on scratch data, and keeps those timings (never
// anything computed from a parameter); each call then takes the route fastest over its T
// steps, preparation included. The weights are prepared afresh by every call.
// LSTMKIT_NATIVE_PRODUCT=aten, =onednn or =rows in the environment forces a route (tests).

#include "products.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace lstmkit {
namespace {

using at::Tensor;

constexpr Route kRoutes[] = {Route::kAten, Route::kOneDnn, Route::kRows};
constexpr const char* kRouteNames[] = {"aten", "onednn", "rows"};
constexpr int64_t kMaxLoopRows = 8;  // the loop route's candidates: at most this many rows

using LinearOp = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                        c10::string_view, c10::List<std::optional<c10::Scalar>>,
                        std::optional<c10::string_view>);
using LinearAddOp = Tensor(const Tensor&, const Tensor&, const Tensor&,
                           const std::optional<Tensor>&, c10::string_view);
using ReorderOp = Tensor(const Tensor&, std::optional<int64_t>);

// torch's oneDNN linear operators, or nulls where this build has none.
struct OneDnn {
  std::optional<c10::TypedOperatorHandle<LinearOp>> linear;
  std::optional<c10::TypedOperatorHandle<LinearAddOp>> linear_add;
  std::optional<c10::TypedOperatorHandle<ReorderOp>> reorder;
};

const OneDnn& onednn() {
  static const OneDnn ops = [] {
    OneDnn found;
    auto& dispatcher = c10::Dispatcher::singleton();
    const auto linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
    const auto add = dispatcher.findSchema({"mkldnn::_linear_pointwise", "binary"});
    const auto reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
    if (!at::hasMKLDNN() || !linear || !add || !reorder) return found;
    try {
      found.linear = linear->typed<LinearOp>();
      found.linear_add = add->typed<LinearAddOp>();
      found.reorder = reorder->typed<ReorderOp>();
    } catch (const c10::Error&) {  // another signature in this torch: not used
      return OneDnn{};
    }
    return found;
  }();
  return ops;
}

// y = base + a w for n rows (base null: 0), w (in, out) row-major: per row, one pass over y
// per input value, which the compiler vectorises along `out`.
template <typename T>
void rows_product(T* __restrict__ y, const T* __restrict__ base, const T* __restrict__ a,
                  const T* __restrict__ w, int64_t n, int64_t in, int64_t out) {
  for (int64_t r = 0; r < n; ++r) {
    T* __restrict__ yr = y + r * out;
    if (base != nullptr) {
      std::memcpy(yr, base + r * out, out * sizeof(T));
    } else {
      std::fill(yr, yr + out, T(0));
    }
    for (int64_t k = 0; k < in; ++k) {
      const T ak = a[r * in + k];
      const T* __restrict__ wk = w + k * out;
      for (int64_t o = 0; o < out; ++o) yr[o] += ak * wk[o];
    }
  }
}

}  // namespace

Product::Product(const Tensor& weight, int64_t rows, Route route) : weight_(weight), route_(route) {
  if (route_ == Route::kOneDnn) {
    prepared_ = onednn().reorder->call(weight.t().contiguous(), rows);  // (out, in), blocked
  } else if (route_ == Route::kRows) {
    prepared_ = weight.contiguous();  // (in, out), row-major
  }
}

void Product::operator()(Tensor& out, const Tensor& a, const Tensor* base) const {
  switch (route_) {
    case Route::kAten:
      if (base != nullptr) {
        at::addmm_out(out, *base, a, weight_);
      } else {
        at::mm_out(out, a, weight_);
      }
      return;
    case Route::kOneDnn:
      out.copy_(base != nullptr
                    ? onednn().linear_add->call(a, *base, prepared_, std::nullopt, "add")
                    : onednn().linear->call(a, prepared_, std::nullopt, "none",
                                            c10::List<std::optional<c10::Scalar>>(), std::nullopt));
      return;
    case Route::kRows:
      AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lstmkit::rows_product", [&] {
        rows_product(out.data_ptr<scalar_t>(),
                     base != nullptr ? base->const_data_ptr<scalar_t>() : nullptr,
                     a.const_data_ptr<scalar_t>(), prepared_.const_data_ptr<scalar_t>(), a.size(0),
                     a.size(1), out.size(1));
      });
      return;
  }
}

namespace {

// The median of `repeats` timings of f, in seconds.
template <typename F>
double median_seconds(F f, int repeats) {
  std::vector<double> times;
  for (int k = 0; k < repeats; ++k) {
    const auto start = std::chrono::steady_clock::now();
    f();
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(times.begin(), times.begin() + repeats / 2, times.end());
  return times[repeats / 2];
}

// Seconds per product and per preparation of the weight, for each route (infinite: not a
// candidate here, or a result that disagrees with ATen's).
struct Timings {
  double product[3] = {0, INFINITY, INFINITY};
  double prepare[3] = {0, 0, 0};
};

bool candidate(Route route, at::ScalarType dtype, int64_t rows) {
  switch (route) {
    case Route::kOneDnn:
      return dtype == at::kFloat && onednn().linear.has_value();
    case Route::kRows:
      return rows <= kMaxLoopRows;
    case Route::kAten:
      break;
  }
  return true;
}

// Every candidate route timed on scratch data for products of `rows` rows by an (in, out)
// weight, stored transposed (an (out, in) matrix's view) or not, as the layer's will be (ATen's
// speed depends on it); each result checked against ATen's first.
Timings measure(at::ScalarType dtype, int64_t rows, int64_t in, int64_t out, bool transposed) {
  const auto options = at::TensorOptions().dtype(dtype);
  // its own generator: the user's random stream (dropout masks) must not depend on this
  const at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(0);
  const auto draw = [&](int64_t r, int64_t c) { return at::randn({r, c}, generator, options); };
  const Tensor weight =
      (transposed ? draw(out, in).t() : draw(in, out)) / std::sqrt(static_cast<double>(in));
  const Tensor a = draw(rows, in), base = draw(rows, out);
  Tensor y = at::empty({rows, out}, options), want = at::empty({rows, out}, options);
  Product(weight, rows, Route::kAten)(want, a, &base);
  constexpr int kRepeats = 9;
  // enough calls per timing to be well above the clock's resolution
  const int calls = static_cast<int>(std::clamp<int64_t>(2000000 / (rows * in * out + 1), 1, 64));
  Timings t;
  for (const Route route : kRoutes) {
    const auto r = static_cast<int>(route);
    if (!candidate(route, dtype, rows)) continue;
    const auto prepare = [&] { return Product(weight, rows, route); };
    const Product product = prepare();
    product(y, a, &base);
    if (!at::allclose(y, want, 1e-4, 1e-4)) continue;
    t.prepare[r] = route == Route::kAten ? 0.0 : median_seconds(prepare, kRepeats);
    const auto run = [&] {
      for (int k = 0; k < calls; ++k) product(y, a, &base);
    };
    median_seconds(run, 3);  // warm up
    t.product[r] = median_seconds(run, kRepeats) / calls;
  }
  return t;
}

// The route for `uses` products of `rows` rows by an (in, out) weight (stored transposed or
// not) in one call.
Route route_for(at::ScalarType dtype, int64_t rows, int64_t in, int64_t out, bool transposed,
                int64_t uses) {
  if (const char* forced = std::getenv("LSTMKIT_NATIVE_PRODUCT")) {
    for (const Route route : kRoutes) {
      if (kRouteNames[static_cast<int>(route)] == std::string_view(forced)) {
        return candidate(route, dtype, rows) ? route : Route::kAten;
      }
    }
  }
  if (rows == 0) return Route::kAten;
  static std::mutex mutex;
  static std::map<std::tuple<at::ScalarType, int64_t, int64_t, int64_t, bool, int>, Timings>
      measured;
  const auto key = std::make_tuple(dtype, rows, in, out, transposed, at::get_num_threads());
  Timings t;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    auto found = measured.find(key);
    if (found == measured.end()) {
      const at::NoGradGuard no_grad;
      found = measured.emplace(key, measure(dtype, rows, in, out, transposed)).first;
    }
    t = found->second;
  }
  Route best = Route::kAten;
  double best_cost = INFINITY;
  for (const Route route : kRoutes) {
    const auto r = static_cast<int>(route);
    const double cost = t.prepare[r] + static_cast<double>(uses) * t.product[r];
    if (cost < best_cost) {
      best = route;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace

Product product(const Tensor& weight, int64_t rows, int64_t uses) {
  return Product(weight, rows,
                 route_for(weight.scalar_type(), rows, weight.size(0), weight.size(1),
                           !weight.is_contiguous(), uses));
}

std::string product_route(at::ScalarType dtype, int64_t rows, int64_t in, int64_t out,
                          bool transposed, int64_t uses) {
  return kRouteNames[static_cast<int>(route_for(dtype, rows, in, out, transposed, uses))];
}

}  // namespace lstmkit
