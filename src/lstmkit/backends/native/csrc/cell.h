// The equations of one step of each built-in cell, for one row of the batch: the passes over
// a row's gates forward and backward, with the vectorisable exp, sigmoid and tanh and the layer
// norm they use. Shared by the training recurrence (recurrence.cpp) and the float32 inference
// kernel (inference.cpp). Gate blocks in torch.nn.LSTM's order (i, f, g, o); cifg has three,
// (f, g, o).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "simd.h"

namespace lstmkit {
// Internal linkage, as if written in each file that includes it: GCC then inlines these small
// functions into the loops that call them and vectorises the loops (as extern inline functions
// they stayed calls, and the gate passes ran scalar).
namespace {

using std::int64_t;

// exp(x) for float32 that the compiler vectorises (std::exp stays a scalar call without
// -ffast-math): x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), and 2^n
// put into the exponent bits. Relative error about 2e-7 (a few ulps). Written so that GCC
// vectorises it under -fno-trapping-math: selects, not fmin/fmax; rounding to the nearest
// integer by adding and subtracting 1.5 * 2^23, not std::floor. Always inlined, as are the
// float sigmoid and tanh_ below: the loops that call them vectorise only with their bodies in
// them, and GCC's inliner alone let them go once inference.cpp grew (layer norm's inference at
// M, 2 threads, took 1.10-1.13x nn.LSTM's time against 0.98-0.99).
[[gnu::always_inline]] inline float exp_vectorisable(float x) {
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

[[gnu::always_inline]] inline float sigmoid(float x) {
  return 1.0f / (1.0f + exp_vectorisable(-x));
}
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
// float32: tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1e-7); float64: the library's tanh.
[[gnu::always_inline]] inline float tanh_(float x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }
inline double tanh_(double x) { return std::tanh(x); }

// The same three on a vector of floats, written out: the compiler's vectorisation of the scalar
// forms above (blends for the clamps, two adds for the rounding) ran the gate passes about half
// as fast. NaN stays NaN.
inline Vec exp_lanes(Vec x) {
  x = clamp(x, -87.0f, 88.0f);
  const Vec n = round_nearest(mul(x, broadcast(1.44269504088896341f)));
  const Vec r = fma(n, broadcast(2.12194440e-4f), fma(n, broadcast(-0.693359375f), x));
  Vec p = broadcast(1.9875691500e-4f);
  p = fma(p, r, broadcast(1.3981999507e-3f));
  p = fma(p, r, broadcast(8.3334519073e-3f));
  p = fma(p, r, broadcast(4.1665795894e-2f));
  p = fma(p, r, broadcast(1.6666665459e-1f));
  p = fma(p, r, broadcast(5.0000001201e-1f));
  const Vec e = add(fma(mul(p, r), r, r), broadcast(1.0f));
  return mul(e, exp2_whole(n));
}
inline Vec sigmoid(Vec x) {
  const Vec one = broadcast(1.0f);
  return div(one, add(one, exp_lanes(sub(broadcast(0.0f), x))));
}
inline Vec tanh_(Vec x) { return fma(broadcast(2.0f), sigmoid(add(x, x)), broadcast(-1.0f)); }

// sum_j term(j) over j in [0, n), in 16 independent partial sums that the compiler can keep in
// vector registers (one running sum would be a chain it may not reorder): float64's layer-norm
// sums (float32's run on vector_sum below).
template <typename T, typename Term>
T lane_sum(int64_t n, Term term) {
  constexpr int64_t kLanes = 16;
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += term(j + k);
  }
  T total = 0;
  for (; j < n; ++j) total += term(j);
  for (const T lane : lanes) total += lane;
  return total;
}

constexpr double kLayerNormEps = 1e-5;  // lstmkit.cells.LAYER_NORM_EPS

// float32's forms of normalise and normalise_backward below, a vector at a time. lane_sum's 16
// lanes, added one after another through memory at the end, cost more than the sums themselves
// at H = 64 (layer norm's S training at 1 thread took 1.27x nn.LSTM's time on an Intel Xeon).

// The sum of term(j) (a vector: values j .. j + kLanes) over the whole vectors of j < whole, in
// four running sums, so that the adds do not wait on each other.
template <typename Term>
float vector_sum(int64_t whole, Term term) {
  Vec sums[4] = {broadcast(0.0f), broadcast(0.0f), broadcast(0.0f), broadcast(0.0f)};
  int64_t j = 0;
  for (; j + 4 * kLanes <= whole; j += 4 * kLanes) {
    for (int q = 0; q < 4; ++q) sums[q] = add(sums[q], term(j + q * kLanes));
  }
  for (; j < whole; j += kLanes) sums[0] = add(sums[0], term(j));
  return sum_lanes(add(add(sums[0], sums[1]), add(sums[2], sums[3])));
}

// The mean of v's n values and 1 / sqrt(their variance + eps), in float32.
struct Moments {
  float mean, rstd;
};

inline Moments moments(const float* __restrict__ v, int64_t n) {
  const int64_t whole = n / kLanes * kLanes;
  float sum = vector_sum(whole, [&](int64_t j) { return load(v + j); });
  for (int64_t j = whole; j < n; ++j) sum += v[j];
  const float mean = sum / static_cast<float>(n);
  const Vec m = broadcast(mean);
  float square = vector_sum(whole, [&](int64_t j) {
    const Vec d = sub(load(v + j), m);
    return mul(d, d);
  });
  for (int64_t j = whole; j < n; ++j) square += (v[j] - mean) * (v[j] - mean);
  return {mean,
          1.0f / std::sqrt(square / static_cast<float>(n) + static_cast<float>(kLayerNormEps))};
}

inline float normalise_lanes(const float* __restrict__ v, float* __restrict__ out, int64_t n,
                             float* mean_out) {
  const Moments s = moments(v, n);
  if (mean_out != nullptr) *mean_out = s.mean;
  const int64_t whole = n / kLanes * kLanes;
  const Vec m = broadcast(s.mean), r = broadcast(s.rstd);
  for (int64_t j = 0; j < whole; j += kLanes) store(out + j, mul(sub(load(v + j), m), r));
  for (int64_t j = whole; j < n; ++j) out[j] = (v[j] - s.mean) * s.rstd;
  return s.rstd;
}

inline void normalise_backward_lanes(float* __restrict__ d, const float* __restrict__ xhat,
                                     float rstd, int64_t n) {
  const int64_t whole = n / kLanes * kLanes;
  float sum = vector_sum(whole, [&](int64_t j) { return load(d + j); });
  float product = vector_sum(whole, [&](int64_t j) { return mul(load(d + j), load(xhat + j)); });
  for (int64_t j = whole; j < n; ++j) {
    sum += d[j];
    product += d[j] * xhat[j];
  }
  const float mean_d = sum / static_cast<float>(n), mean_dx = product / static_cast<float>(n);
  const Vec r = broadcast(rstd), md = broadcast(mean_d), mdx = broadcast(mean_dx);
  for (int64_t j = 0; j < whole; j += kLanes) {
    store(d + j, mul(r, sub(sub(load(d + j), md), mul(load(xhat + j), mdx))));
  }
  for (int64_t j = whole; j < n; ++j) d[j] = rstd * (d[j] - mean_d - xhat[j] * mean_dx);
}

// v (n values) normalised: out = (v - mean) / sqrt(var + eps); returns 1 / sqrt(var + eps)
// and, where `mean_out` is given, stores the mean there.
template <typename T>
T normalise(const T* __restrict__ v, T* __restrict__ out, int64_t n, T* mean_out = nullptr) {
  if constexpr (std::is_same_v<T, float>) {
    return normalise_lanes(v, out, n, mean_out);
  } else {
    const T mean = lane_sum<T>(n, [&](int64_t j) { return v[j]; }) / T(n);
    if (mean_out != nullptr) *mean_out = mean;
    const T var = lane_sum<T>(n, [&](int64_t j) { return (v[j] - mean) * (v[j] - mean); }) / T(n);
    const T rstd = T(1) / std::sqrt(var + T(kLayerNormEps));
    for (int64_t j = 0; j < n; ++j) out[j] = (v[j] - mean) * rstd;
    return rstd;
  }
}

// Layer norm's backward for one row: d (n values, the gradient of the normalised xhat, gain
// already applied) becomes the gradient of the input, rstd (d - mean(d) - xhat mean(d xhat)).
template <typename T>
void normalise_backward(T* __restrict__ d, const T* __restrict__ xhat, T rstd, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    normalise_backward_lanes(d, xhat, rstd, n);
  } else {
    const T mean_d = lane_sum<T>(n, [&](int64_t j) { return d[j]; }) / T(n);
    const T mean_dx = lane_sum<T>(n, [&](int64_t j) { return d[j] * xhat[j]; }) / T(n);
    for (int64_t j = 0; j < n; ++j) d[j] = rstd * (d[j] - mean_d - xhat[j] * mean_dx);
  }
}

enum class Kind { kLstm, kPeephole, kCifg, kLayerNorm };

Kind parse_kind(std::string_view name) {
  if (name == "lstm") return Kind::kLstm;
  if (name == "peephole") return Kind::kPeephole;
  if (name == "cifg") return Kind::kCifg;
  TORCH_CHECK(name == "layernorm",
              "lstmkit::recurrence: kind must be lstm, peephole, cifg or layernorm, got ", name);
  return Kind::kLayerNorm;
}

// Blocks of H rows in a kind's W_ih, W_hh and biases: its gates (cifg couples i and f).
inline int64_t gate_blocks(Kind kind) { return kind == Kind::kCifg ? 3 : 4; }

// The cell's parameters besides the weights, as raw pointers (null where the cell has none),
// and its sizes.
template <typename T>
struct Cell {
  Kind kind;
  int64_t hidden;         // H
  const T* peephole;      // (3H): p_i, p_f, p_o
  const T* ln_hh_weight;  // (4H)
  const T* ln_hh_bias;    // (4H)
  const T* ln_c_weight;   // (H)
  const T* ln_c_bias;     // (H)
};

// The passes over one row's gates. Every block is its own __restrict__ parameter: pointers
// into one buffer that the compiler cannot tell apart would stop it from vectorising the loops
// (or make it check for overlaps at run time).

// lstm and peephole (kPeephole), forward: the pre-activations z_i, z_f, z_g, z_o are replaced
// by their activations, c receives c' = f c_prev + i g and m (where kOutput) o tanh(c').
template <typename T, bool kPeephole, bool kOutput>
void ifgo_forward(T* __restrict__ gi, T* __restrict__ gf, T* __restrict__ gg, T* __restrict__ go,
                  const T* __restrict__ c_prev, T* __restrict__ c, T* __restrict__ m,
                  const T* __restrict__ p_i, const T* __restrict__ p_f, const T* __restrict__ p_o,
                  int64_t hidden) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {  // whole vectors; the loop below does the rest
    for (; j + kLanes <= hidden; j += kLanes) {
      const Vec cp = load(c_prev + j);
      Vec zi = load(gi + j), zf = load(gf + j), zo = load(go + j);
      if constexpr (kPeephole) {
        zi = fma(load(p_i + j), cp, zi);
        zf = fma(load(p_f + j), cp, zf);
      }
      const Vec i = sigmoid(zi), f = sigmoid(zf), cand = tanh_(load(gg + j));
      const Vec next = fma(f, cp, mul(i, cand));
      if constexpr (kPeephole) zo = fma(load(p_o + j), next, zo);
      const Vec o = sigmoid(zo);
      store(gi + j, i);
      store(gf + j, f);
      store(gg + j, cand);
      store(go + j, o);
      store(c + j, next);
      if constexpr (kOutput) store(m + j, mul(o, tanh_(next)));
    }
  }
  for (; j < hidden; ++j) {
    const T cp = c_prev[j];
    T zi = gi[j], zf = gf[j], zo = go[j];
    if constexpr (kPeephole) {
      zi += p_i[j] * cp;
      zf += p_f[j] * cp;
    }
    const T i = sigmoid(zi), f = sigmoid(zf), cand = tanh_(gg[j]);
    const T next = f * cp + i * cand;
    if constexpr (kPeephole) zo += p_o[j] * next;
    const T o = sigmoid(zo);
    gi[j] = i;
    gf[j] = f;
    gg[j] = cand;
    go[j] = o;
    c[j] = next;
    if constexpr (kOutput) m[j] = o * tanh_(next);
  }
}

// cifg, forward: blocks (f, g, o), c' = f c_prev + (1 - f) g.
template <typename T>
void fgo_forward(T* __restrict__ gf, T* __restrict__ gg, T* __restrict__ go,
                 const T* __restrict__ c_prev, T* __restrict__ c, T* __restrict__ m,
                 int64_t hidden) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kLanes <= hidden; j += kLanes) {
      const Vec f = sigmoid(load(gf + j)), cand = tanh_(load(gg + j)), o = sigmoid(load(go + j));
      const Vec next = fma(f, load(c_prev + j), mul(sub(broadcast(1.0f), f), cand));
      store(gf + j, f);
      store(gg + j, cand);
      store(go + j, o);
      store(c + j, next);
      store(m + j, mul(o, tanh_(next)));
    }
  }
  for (; j < hidden; ++j) {
    const T f = sigmoid(gf[j]), cand = tanh_(gg[j]), o = sigmoid(go[j]);
    const T next = f * c_prev[j] + (T(1) - f) * cand;
    gf[j] = f;
    gg[j] = cand;
    go[j] = o;
    c[j] = next;
    m[j] = o * tanh_(next);
  }
}

// m = o tanh(y), y = gain chat + shift (the layernorm cell's output, and m again in backward).
template <typename T>
void layernorm_output(const T* __restrict__ go, const T* __restrict__ chat,
                      const T* __restrict__ gain, const T* __restrict__ shift, T* __restrict__ m,
                      int64_t hidden) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kLanes <= hidden; j += kLanes) {
      store(m + j, mul(load(go + j), tanh_(fma(load(gain + j), load(chat + j), load(shift + j)))));
    }
  }
  for (; j < hidden; ++j) m[j] = go[j] * tanh_(gain[j] * chat[j] + shift[j]);
}

// m = o tanh(c) (m again in backward, for dW_hr).
template <typename T>
void plain_output(const T* __restrict__ go, const T* __restrict__ c, T* __restrict__ m,
                  int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) m[j] = go[j] * tanh_(c[j]);
}

// Step t's pass over the gates of one row. In: z (G H pre-activations, replaced by their
// activations), c_prev. Out: c (c'), m = o tanh(y); layernorm also keeps chat = LN(c') before
// its gain and returns 1 / std of c' (1 for the other cells).
template <typename T>
T gates_forward_row(const Cell<T>& cell, T* z, const T* c_prev, T* c, T* m, T* chat) {
  const int64_t h = cell.hidden;
  const T* p = cell.peephole;
  switch (cell.kind) {
    case Kind::kCifg:
      fgo_forward(z, z + h, z + 2 * h, c_prev, c, m, h);
      return T(1);
    case Kind::kPeephole:
      ifgo_forward<T, true, true>(z, z + h, z + 2 * h, z + 3 * h, c_prev, c, m, p, p + h, p + 2 * h,
                                  h);
      return T(1);
    case Kind::kLstm:
      ifgo_forward<T, false, true>(z, z + h, z + 2 * h, z + 3 * h, c_prev, c, m, nullptr, nullptr,
                                   nullptr, h);
      return T(1);
    case Kind::kLayerNorm:
      break;
  }
  ifgo_forward<T, false, false>(z, z + h, z + 2 * h, z + 3 * h, c_prev, c, nullptr, nullptr,
                                nullptr, nullptr, h);
  const T rstd = normalise(c, chat, h);
  layernorm_output(z + 3 * h, chat, cell.ln_c_weight, cell.ln_c_bias, m, h);
  return rstd;
}

// lstm and peephole, backward of one row. In: the activated gates, c_prev, c (c'), dm =
// dL/dm, dc = dL/dc' from later steps and zoneout. Out: the pre-activation gradients, and dc
// becomes c_{t-1}'s share of them.
template <typename T, bool kPeephole>
void ifgo_backward(const T* __restrict__ gi, const T* __restrict__ gf, const T* __restrict__ gg,
                   const T* __restrict__ go, const T* __restrict__ c_prev, const T* __restrict__ c,
                   const T* __restrict__ dm, T* __restrict__ dc, T* __restrict__ di,
                   T* __restrict__ df, T* __restrict__ dcand, T* __restrict__ dout,
                   const T* __restrict__ p_i, const T* __restrict__ p_f, const T* __restrict__ p_o,
                   int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    const T i = gi[j], f = gf[j], cand = gg[j], o = go[j];
    const T tc = tanh_(c[j]);
    const T d_o = dm[j] * tc * o * (T(1) - o);
    T dcell = dc[j] + dm[j] * o * (T(1) - tc * tc);
    if constexpr (kPeephole) dcell += p_o[j] * d_o;
    const T d_i = dcell * cand * i * (T(1) - i);
    const T d_f = dcell * c_prev[j] * f * (T(1) - f);
    di[j] = d_i;
    df[j] = d_f;
    dcand[j] = dcell * i * (T(1) - cand * cand);
    dout[j] = d_o;
    if constexpr (kPeephole) {
      dc[j] = dcell * f + p_i[j] * d_i + p_f[j] * d_f;
    } else {
      dc[j] = dcell * f;
    }
  }
}

// cifg, backward of one row (blocks f, g, o); as ifgo_backward.
template <typename T>
void fgo_backward(const T* __restrict__ gf, const T* __restrict__ gg, const T* __restrict__ go,
                  const T* __restrict__ c_prev, const T* __restrict__ c, const T* __restrict__ dm,
                  T* __restrict__ dc, T* __restrict__ df, T* __restrict__ dcand,
                  T* __restrict__ dout, int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    const T f = gf[j], cand = gg[j], o = go[j];
    const T tc = tanh_(c[j]);
    const T dcell = dc[j] + dm[j] * o * (T(1) - tc * tc);
    df[j] = dcell * (c_prev[j] - cand) * f * (T(1) - f);
    dcand[j] = dcell * (T(1) - f) * (T(1) - cand * cand);
    dout[j] = dm[j] * tc * o * (T(1) - o);
    dc[j] = dcell * f;
  }
}

// layernorm, backward of one row through m = o tanh(y), y = gain chat + shift: dout, the
// gradient of y times the gain (into dchat, for LN_c's backward), and the gain's and shift's
// gradients (added to).
template <typename T>
void layernorm_output_backward(const T* __restrict__ go, const T* __restrict__ chat,
                               const T* __restrict__ gain, const T* __restrict__ shift,
                               const T* __restrict__ dm, T* __restrict__ dout,
                               T* __restrict__ dchat, T* __restrict__ dgain, T* __restrict__ dshift,
                               int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    const T o = go[j];
    const T ty = tanh_(gain[j] * chat[j] + shift[j]);
    const T dy = dm[j] * o * (T(1) - ty * ty);
    dout[j] = dm[j] * ty * o * (T(1) - o);
    dgain[j] += dy * chat[j];
    dshift[j] += dy;
    dchat[j] = dy * gain[j];
  }
}

// The backward of y = gain xhat + shift for one row of n values, from dy: the gain's and the
// shift's gradients added to dgain and dshift, and dxhat = dy gain (restrict-qualified: GCC
// left the loop scalar where it could not rule out that the outputs overlap).
template <typename T>
void affine_backward(const T* __restrict__ dy, const T* __restrict__ xhat,
                     const T* __restrict__ gain, T* __restrict__ dgain, T* __restrict__ dshift,
                     T* __restrict__ dxhat, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dgain[j] += dy[j] * xhat[j];
    dshift[j] += dy[j];
    dxhat[j] = dy[j] * gain[j];
  }
}

// layernorm, the gates i, f, g backward given dL/dc' = dc + dcell (dcell from LN_c's
// backward); dc becomes c_{t-1}'s share.
template <typename T>
void ifg_backward(const T* __restrict__ gi, const T* __restrict__ gf, const T* __restrict__ gg,
                  const T* __restrict__ c_prev, const T* __restrict__ dcell_ln, T* __restrict__ dc,
                  T* __restrict__ di, T* __restrict__ df, T* __restrict__ dcand, int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    const T i = gi[j], f = gf[j], cand = gg[j];
    const T dcell = dc[j] + dcell_ln[j];
    di[j] = dcell * cand * i * (T(1) - i);
    df[j] = dcell * c_prev[j] * f * (T(1) - f);
    dcand[j] = dcell * i * (T(1) - cand * cand);
    dc[j] = dcell * f;
  }
}

// Step t's pass over the gates of one row, backward. In: the activated gates g, c_prev, c
// (c'), chat and rstd (layernorm), dm = dL/dm, dc = dL/dc' from later steps and zoneout. Out:
// dz (the pre-activation gradients), dc becomes c_{t-1}'s share of them, m (where not null)
// receives m again (for dW_hr), and layernorm adds to dgain_c and dshift_c; `work` holds H
// values of scratch.
template <typename T>
void gates_backward_row(const Cell<T>& cell, const T* g, const T* c_prev, const T* c, const T* chat,
                        T rstd, const T* dm, T* dc, T* dz, T* m, T* dgain_c, T* dshift_c, T* work) {
  const int64_t h = cell.hidden;
  const T* p = cell.peephole;
  switch (cell.kind) {
    case Kind::kCifg:
      fgo_backward(g, g + h, g + 2 * h, c_prev, c, dm, dc, dz, dz + h, dz + 2 * h, h);
      if (m != nullptr) plain_output(g + 2 * h, c, m, h);
      return;
    case Kind::kPeephole:
      ifgo_backward<T, true>(g, g + h, g + 2 * h, g + 3 * h, c_prev, c, dm, dc, dz, dz + h,
                             dz + 2 * h, dz + 3 * h, p, p + h, p + 2 * h, h);
      if (m != nullptr) plain_output(g + 3 * h, c, m, h);
      return;
    case Kind::kLstm:
      ifgo_backward<T, false>(g, g + h, g + 2 * h, g + 3 * h, c_prev, c, dm, dc, dz, dz + h,
                              dz + 2 * h, dz + 3 * h, nullptr, nullptr, nullptr, h);
      if (m != nullptr) plain_output(g + 3 * h, c, m, h);
      return;
    case Kind::kLayerNorm:
      break;
  }
  const T *gain = cell.ln_c_weight, *shift = cell.ln_c_bias;
  layernorm_output_backward(g + 3 * h, chat, gain, shift, dm, dz + 3 * h, work, dgain_c, dshift_c,
                            h);
  if (m != nullptr) layernorm_output(g + 3 * h, chat, gain, shift, m, h);
  normalise_backward(work, chat, rstd, h);
  ifg_backward(g, g + h, g + 2 * h, c_prev, work, dc, dz, dz + h, dz + 2 * h, h);
}

}  // namespace
}  // namespace lstmkit
