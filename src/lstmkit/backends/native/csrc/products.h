// The per-step products of the training recurrence and how their route is chosen: see
// products.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace lstmkit {

enum class Route { kAten, kOneDnn, kRows };

// out = a @ weight (+ base): weight (in, out), a view is fine; a, base, out (n, .) row-major.
class Product {
 public:
  Product(const at::Tensor& weight, int64_t rows, Route route);
  void operator()(at::Tensor& out, const at::Tensor& a, const at::Tensor* base = nullptr) const;

 private:
  at::Tensor weight_, prepared_;
  Route route_;
};

// The product by `weight` (in, out) for a loop of `uses` products of at most `rows` rows.
Product product(const at::Tensor& weight, int64_t rows, int64_t uses);

// Which route products of `rows` rows by an (in, out) weight of `dtype` (stored transposed,
// as the forward's W_hh^T, or not, as the backward's W_hh) take in a call of `uses` steps:
// "aten", "onednn" or "rows" (for tests and benchmark reports).
std::string product_route(at::ScalarType dtype, int64_t rows, int64_t in, int64_t out,
                          bool transposed, int64_t uses);

}  // namespace lstmkit
