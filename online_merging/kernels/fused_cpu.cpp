// One fused pass per tensor for the online-merging optimizer step on the CPU (float32 parameters).
//
// Each element is read once and written once: the Adam (or SGD) moments, the update Δ, the DARE keep
// decision from the counter-based hash (online_merging/rng.py), the merge with τ, weight decay and step-K.
// OnTIES needs the top-p threshold of the whole update first, so it runs as: a pass that writes the update
// to a scratch buffer, an exact radix selection of the threshold, and a pass that merges.
// Element i's random bits, with g = offset + i its index in the whole parameter (the tensor may be a piece):
//   bits(g) = lowbias32(lo32(g) ^ k),  k = lowbias32(hi32(g) ^ k2) ^ k1,  kept iff bits < threshold.
// The loops are branch-free (modes and flags are template parameters) so that the compiler vectorises them.
// Masked updates (ALLO): with an element mask `keep` (bool per element, MASKED template flag), an element whose
// keep is false keeps θ and every state value (moments, momentum, step-K buffer) and counts as Δ = 0 in OnTIES's
// top-p; without one (MASKED = false) `on` is the constant true and the loops are the unmasked ones.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <functional>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float sign(float x) { return static_cast<float>((x > 0.f) - (x < 0.f)); }

// a where the bit mask `on` is all ones, b where it is 0: a branch-free blend of the bit patterns, exact for every
// value (-0, inf, NaN). With `on` the constant ~0u (unmasked passes) it folds to a. The mask is read as bytes
// (on_bits): with bool loads GCC does not vectorise the loops.
inline float pick(uint32_t on, float a, float b) {
  uint32_t x, y;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  x = (x & on) | (y & ~on);
  float r;
  std::memcpy(&r, &x, sizeof r);
  return r;
}
template <bool MASKED>
inline uint32_t on_bits(const uint8_t* keep, int64_t i) {
  if (MASKED) return 0u - static_cast<uint32_t>(keep[i]);
  return ~0u;
}

// What happens once the update Δ of an element is known.
enum Mode : int {
  kPlain = 0,            // θ ← decay·θ + Δ
  kDare = 1,             // θ ← decay·θ + (1−α)·R(Δ) + α·clamp(R(τ))
  kAccumulate = 2,       // step-K between merges: θ ← decay·θ + Δ, Δc ← Δc + Δ
  kDareMerge = 3,        // step-K merge: θ ← decay·θ − Δc + (1−α)·R(Δc + Δ) + α·clamp(R(τ)), Δc ← 0
  kWriteTotal = 4,       // OnTIES first pass: scratch ← Δ
  kWriteTotalMerge = 5,  // OnTIES first pass on a step-K merge step: scratch ← Δc + Δ
};

struct Merge {
  float decay, update_scale, alpha, tau_scale, clamp;  // clamp = +inf: none
  uint32_t threshold;
  bool keep_all;
  uint32_t k1u, k2u, k1t, k2t;  // keys of the update's and τ's draws
  int64_t offset;                // global flat index of element 0
};

// Adam: updates the moments of element i and returns Δ_i.
template <bool AMSGRAD>
struct AdamRule {
  const float* __restrict__ grad;
  float* __restrict__ exp_avg;
  float* __restrict__ exp_avg_sq;
  float* __restrict__ max_exp_avg_sq;
  float one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, grad_sign;

  // The same operations in the same order as torch's AdamW (lerp, addcmul, sqrt / bc2 + eps), so that with
  // -ffp-contract=off the update is bit-identical to the eager backend's.
  // Masked out (on = 0): the moments keep their values and Δ = 0.
  inline float operator()(int64_t i, float, uint32_t on) const {
    const float g = grad[i] * grad_sign;
    const float m_old = exp_avg[i];
    const float m = m_old + one_minus_beta1 * (g - m_old);
    const float v_old = exp_avg_sq[i];
    float v = v_old * beta2 + one_minus_beta2 * g * g;
    exp_avg[i] = pick(on, m, m_old);
    exp_avg_sq[i] = pick(on, v, v_old);
    if (AMSGRAD) {
      const float max_old = max_exp_avg_sq[i];
      v = std::max(v, max_old);
      max_exp_avg_sq[i] = pick(on, v, max_old);
    }
    const float delta = m * step_size / (std::sqrt(v) / bc2_sqrt + eps);
    return pick(on, delta, 0.f);
  }
};

// SGD as torch.optim.SGD: returns Δ_i = −lr·(momentum buffer of g + λθ). The flags are 0/1 floats and the
// choices are x·f + y·(1−f), exact for finite values, because GCC does not vectorise this loop with selects.
template <bool MOMENTUM>
struct SgdRule {
  const float* __restrict__ grad;
  float* __restrict__ momentum_buffer;
  float lr, momentum, one_minus_dampening, weight_decay, grad_sign, nesterov, first;

  inline float operator()(int64_t i, float theta, uint32_t on) const {
    float g = grad[i] * grad_sign + weight_decay * theta;
    if (MOMENTUM) {
      const float previous = momentum_buffer[i];
      const float b = g * first + (previous * momentum + one_minus_dampening * g) * (1.f - first);
      momentum_buffer[i] = pick(on, b, previous);
      g = (g + momentum * b) * nesterov + b * (1.f - nesterov);
    }
    return pick(on, -lr * g, 0.f);
  }
};

template <int MODE, bool MASKED, typename Rule, typename T>
void fused_pass(const Rule& rule_, float* __restrict__ param, const T* __restrict__ tau, float* __restrict__ buffer,
                float* __restrict__ scratch, const uint8_t* __restrict__ keep, const Merge& mg, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    // Local copies: loop invariants the compiler can keep in registers (stores to param could alias mg).
    const Rule rule = rule_;
    const float decay = mg.decay, update_scale = mg.update_scale, alpha = mg.alpha, tau_scale = mg.tau_scale;
    const float clamp = mg.clamp;
    const uint32_t threshold = mg.threshold;
    const bool keep_all = mg.keep_all;
    const int64_t offset = mg.offset;
    for (int64_t lo = begin; lo < end;) {
      const uint32_t hi = static_cast<uint32_t>((offset + lo) >> 32);
      // Ranges stay inside one 2**32 block of global indices (one key) and below 2**31 elements (32-bit counter).
      const int64_t block_end = ((static_cast<int64_t>(hi) + 1) << 32) - offset;
      const int64_t range_end = std::min({end, block_end, lo + (int64_t(1) << 31)});
      const uint32_t ku = mix32(hi ^ mg.k2u) ^ mg.k1u;
      const uint32_t kt = mix32(hi ^ mg.k2t) ^ mg.k1t;
      const uint32_t base = static_cast<uint32_t>(offset + lo);
      const uint32_t count = static_cast<uint32_t>(range_end - lo);
      // The counter is 32-bit because the hash needs the 32-bit index: converting an int64 index blocks SIMD.
#pragma omp simd
      for (uint32_t j = 0; j < count; ++j) {
        const int64_t i = lo + j;
        const uint32_t index = base + j;
        const float old = param[i];
        const uint32_t on = on_bits<MASKED>(keep, i);
        const float delta = rule(i, old, on);
        if (MODE == kWriteTotal || MODE == kWriteTotalMerge) {
          scratch[i] = MODE == kWriteTotalMerge ? pick(on, buffer[i] + delta, 0.f) : delta;
          continue;
        }
        float theta = old * decay;
        if (MODE == kPlain || MODE == kAccumulate) {
          theta += delta;
          if (MODE == kAccumulate) {
            const float accumulated = buffer[i];
            buffer[i] = pick(on, accumulated + delta, accumulated);
          }
        } else {
          float total = delta;
          if (MODE == kDareMerge) {
            const float accumulated = buffer[i];
            theta -= accumulated;
            total += accumulated;
            buffer[i] = pick(on, 0.f, accumulated);
          }
          const bool keep_update = (mix32(index ^ ku) < threshold) | keep_all;
          const bool keep_tau = (mix32(index ^ kt) < threshold) | keep_all;
          const float t = std::min(std::max(to_float(tau[i]) * tau_scale, -clamp), clamp);
          // + 0·total: a non-finite update reaches θ even where DARE drops it (as eager.merge_update)
          theta += ((keep_update ? total * update_scale : 0.f) + (keep_tau ? alpha * t : 0.f)) + total * 0.f;
        }
        param[i] = pick(on, theta, old);
      }
      lo = range_end;
    }
  });
}

template <typename X>
inline uint32_t abs_bits(const X* x, int64_t i) {
  const float v = std::fabs(to_float(x[i]));
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;  // non-negative floats order as their bit patterns
}

// The exact answer among candidates: sorted by (|x| desc, index asc), the (rank)-th one is the threshold element.
std::array<int64_t, 2> pick(std::vector<std::pair<uint32_t, int64_t>>& candidates, int64_t rank) {
  std::nth_element(candidates.begin(), candidates.begin() + rank, candidates.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  return {static_cast<int64_t>(candidates[rank].first), candidates[rank].second};
}

// Radix selection: a 16-bit histogram of the high half, then of the low half inside the chosen bin.
template <typename X>
std::array<int64_t, 2> radix_select(const X* x, int64_t n, int64_t k) {
  uint32_t prefix = 0;
  int64_t above = 0;  // elements strictly above the bins examined so far
  for (int level = 0; level < 2; ++level) {
    std::vector<std::vector<int64_t>> partial(at::get_num_threads(), std::vector<int64_t>(1 << 16, 0));
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      auto& histogram = partial[at::get_thread_num()];
      for (int64_t i = begin; i < end; ++i) {
        const uint32_t b = abs_bits(x, i);
        if (level == 0) {
          ++histogram[b >> 16];
        } else if ((b >> 16) == prefix) {
          ++histogram[b & 0xFFFF];
        }
      }
    });
    std::vector<int64_t> histogram(1 << 16, 0);
    for (const auto& part : partial)
      for (int j = 0; j < (1 << 16); ++j) histogram[j] += part[j];
    int bin = (1 << 16) - 1;
    for (; bin > 0 && above + histogram[bin] < k; --bin) above += histogram[bin];
    if (level == 0) prefix = static_cast<uint32_t>(bin);
    else prefix = (prefix << 16) | static_cast<uint32_t>(bin);
  }
  std::vector<std::pair<uint32_t, int64_t>> ties;
  for (int64_t i = 0; i < n && static_cast<int64_t>(ties.size()) < k - above; ++i)
    if (abs_bits(x, i) == prefix) ties.emplace_back(prefix, i);
  return {static_cast<int64_t>(prefix), ties.back().second};
}

// Top-k of |x|. Returns {T, cutoff}: keep iff bits(|x_i|) > T, or == T and i <= cutoff; exactly k elements,
// ties at T kept by lower index. A strided sample brackets the k-th value; one pass counts the elements above
// the bracket and collects those inside it; the answer is selected among them. Radix selection is the fallback
// when the bracket misses (exact either way).
template <typename X>
std::array<int64_t, 2> topk_threshold(const X* x, int64_t n, int64_t k) {
  const int64_t m = std::min<int64_t>(n, std::clamp<int64_t>(n / 32, 2048, 1 << 16));
  std::vector<uint32_t> sample(m);
  for (int64_t j = 0; j < m; ++j) sample[j] = abs_bits(x, j * n / m);
  const double rank = static_cast<double>(k) * m / n;
  const double margin = 4.0 * std::sqrt(rank * (1.0 - rank / m)) + 8.0;  // ~4 sigma of the sample rank
  auto order_statistic = [&](int64_t r) {  // the r-th largest of the sample
    std::nth_element(sample.begin(), sample.begin() + r, sample.end(), std::greater<uint32_t>());
    return sample[r];
  };
  const uint32_t high = order_statistic(std::max<int64_t>(0, static_cast<int64_t>(rank - margin)));
  const uint32_t low = order_statistic(std::min<int64_t>(m - 1, static_cast<int64_t>(rank + margin)));
  // Few elements fall inside [low, high] unless |x| has many ties there; past this cap, radix select is cheaper.
  const int64_t cap = static_cast<int64_t>(8.0 * (2 * margin + 1) * n / m) + 4096;
  const int threads = at::get_num_threads();
  std::vector<int64_t> counts(threads, 0);
  std::vector<std::vector<std::pair<uint32_t, int64_t>>> found(threads);
  std::atomic<bool> overflow{false};
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    auto& mine = found[at::get_thread_num()];
    int64_t above = 0;
    constexpr int64_t kBlock = 64;  // small blocks: most hold no candidate, so the scalar collection skips them
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t block_end = std::min<int64_t>(end, block + kBlock);
      int64_t inside = 0;
      for (int64_t i = block; i < block_end; ++i) {  // vectorised counts
        const uint32_t b = abs_bits(x, i);
        above += b > high;
        inside += (b >= low) & (b <= high);
      }
      if (inside == 0) continue;
      for (int64_t i = block; i < block_end; ++i) {
        const uint32_t b = abs_bits(x, i);
        if (b >= low && b <= high) mine.emplace_back(b, i);
      }
      if (static_cast<int64_t>(mine.size()) > cap || overflow.load(std::memory_order_relaxed)) {
        overflow = true;
        return;
      }
    }
    counts[at::get_thread_num()] += above;
  });
  int64_t above = 0;
  std::vector<std::pair<uint32_t, int64_t>> candidates;
  if (!overflow) {
    for (int t = 0; t < threads; ++t) {
      above += counts[t];
      candidates.insert(candidates.end(), found[t].begin(), found[t].end());
    }
  }
  if (!overflow && above < k && k <= above + static_cast<int64_t>(candidates.size()))
    return pick(candidates, k - above - 1);
  return radix_select(x, n, k);
}

// θ ← decay·θ − Δc + (1−α)·a' + α·b', with a = T(total), b = T(τ) and a', b' their elements that agree with the
// elected sign; Δc ← 0. ``total`` is Δc + Δ from the first pass. The cuts are in local indices: a piece's caller
// shifts the whole tensor's cutoff by the piece's offset and clamps it to [-1, n].
template <bool BUFFER, bool MASKED, typename T>
void ties_pass(float* __restrict__ param, float* __restrict__ buffer, const float* __restrict__ total,
               const T* __restrict__ tau, const uint8_t* __restrict__ keep, float decay, float alpha,
               std::array<int64_t, 2> update_cut,
               std::array<int64_t, 2> tau_cut, bool weighted, int64_t n) {
  const uint32_t update_threshold = static_cast<uint32_t>(update_cut[0]);
  const uint32_t tau_threshold = static_cast<uint32_t>(tau_cut[0]);
  const float wa = weighted ? 1.f - alpha : 1.f, wb = weighted ? alpha : 1.f;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t lo = begin; lo < end;) {
      const int64_t range_end = std::min(end, lo + (int64_t(1) << 31));
      const uint32_t count = static_cast<uint32_t>(range_end - lo);
      // Ties at the threshold are kept up to the cutoff index: as a 32-bit bound relative to this range.
      auto tie_bound = [&](int64_t cutoff) {
        return static_cast<uint32_t>(std::clamp<int64_t>(cutoff - lo + 1, 0, count));
      };
      const uint32_t update_ties = tie_bound(update_cut[1]), tau_ties = tie_bound(tau_cut[1]);
#pragma omp simd
      for (uint32_t j = 0; j < count; ++j) {
        const int64_t i = lo + j;
        const float x = total[i];
        const float t = to_float(tau[i]);
        const uint32_t xb = abs_bits(total, i), tb = abs_bits(tau, i);
        const bool keep_x = (xb > update_threshold) | ((xb == update_threshold) & (j < update_ties));
        const bool keep_t = (tb > tau_threshold) | ((tb == tau_threshold) & (j < tau_ties));
        const float a = keep_x ? x : 0.f;
        const float b = keep_t ? t : 0.f;
        const float s = sign(wa * a + wb * b);
        const float merged =
            ((1.f - alpha) * (sign(a) == s ? a : 0.f) + alpha * (sign(b) == s ? b : 0.f)) + x * 0.f;  // 0·x: see DARE
        const uint32_t on = on_bits<MASKED>(keep, i);
        const float old = param[i];
        float theta = old * decay + merged;
        if (BUFFER) {
          const float accumulated = buffer[i];
          theta -= accumulated;
          buffer[i] = pick(on, 0.f, accumulated);
        }
        param[i] = pick(on, theta, old);
      }
      lo = range_end;
    }
  });
}

template <bool MASKED, typename Rule>
void run_mode(int64_t mode, const Rule& rule, const torch::Tensor& param, const c10::optional<torch::Tensor>& tau,
              const c10::optional<torch::Tensor>& buffer, const c10::optional<torch::Tensor>& scratch,
              const uint8_t* keep, const Merge& mg) {
  const int64_t n = param.numel();
  float* p = param.data_ptr<float>();
  float* buf = buffer ? buffer->data_ptr<float>() : nullptr;
  float* out = scratch ? scratch->data_ptr<float>() : nullptr;
  const float* none = nullptr;
  switch (mode) {
    case kPlain: return fused_pass<kPlain, MASKED>(rule, p, none, buf, out, keep, mg, n);
    case kAccumulate: return fused_pass<kAccumulate, MASKED>(rule, p, none, buf, out, keep, mg, n);
    case kWriteTotal: return fused_pass<kWriteTotal, MASKED>(rule, p, none, buf, out, keep, mg, n);
    case kWriteTotalMerge: return fused_pass<kWriteTotalMerge, MASKED>(rule, p, none, buf, out, keep, mg, n);
    case kDare:
    case kDareMerge: {
      TORCH_CHECK(tau.has_value(), "DARE modes need tau");
      auto run = [&](const auto* t) {
        if (mode == kDareMerge) return fused_pass<kDareMerge, MASKED>(rule, p, t, buf, out, keep, mg, n);
        fused_pass<kDare, MASKED>(rule, p, t, buf, out, keep, mg, n);
      };
      if (tau->scalar_type() == at::kFloat) return run(tau->data_ptr<float>());
      return run(tau->data_ptr<c10::BFloat16>());
    }
    default: TORCH_CHECK(false, "unknown mode ", mode);
  }
}

// The rule's pass, masked when `keep` (a bool tensor of the parameter's elements) is given.
template <typename Rule>
void run_rule(int64_t mode, const Rule& rule, const torch::Tensor& param, const c10::optional<torch::Tensor>& tau,
              const c10::optional<torch::Tensor>& buffer, const c10::optional<torch::Tensor>& scratch,
              const c10::optional<torch::Tensor>& keep, const Merge& mg) {
  if (keep) {
    const auto* k = reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>());
    return run_mode<true>(mode, rule, param, tau, buffer, scratch, k, mg);
  }
  run_mode<false>(mode, rule, param, tau, buffer, scratch, nullptr, mg);
}

Merge merge_of(double decay, double update_scale, double alpha, double tau_scale, double clamp, int64_t threshold,
               const std::vector<int64_t>& keys, int64_t offset) {
  TORCH_CHECK(offset >= 0, "offset must be >= 0");
  TORCH_CHECK(keys.size() == 4, "keys must be (k1, k2) of the update then of tau");
  const bool keep_all = threshold >= (int64_t(1) << 32);
  return Merge{static_cast<float>(decay), static_cast<float>(update_scale), static_cast<float>(alpha),
               static_cast<float>(tau_scale), clamp > 0 ? static_cast<float>(clamp) : INFINITY,
               keep_all ? 0u : static_cast<uint32_t>(threshold), keep_all,
               static_cast<uint32_t>(keys[0]), static_cast<uint32_t>(keys[1]), static_cast<uint32_t>(keys[2]),
               static_cast<uint32_t>(keys[3]), offset};
}

void check(const torch::Tensor& t, const torch::Tensor& param, const char* what, at::ScalarType type = at::kFloat) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), what, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.numel() == param.numel(), what, " has ", t.numel(), " elements, the parameter ", param.numel());
  TORCH_CHECK(t.scalar_type() == type, what, " must be ", type);
}

}  // namespace

void adam_pass(int64_t mode, torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
               c10::optional<torch::Tensor> max_exp_avg_sq, c10::optional<torch::Tensor> merge_buffer,
               c10::optional<torch::Tensor> tau, c10::optional<torch::Tensor> scratch, double beta1, double beta2,
               double step_size, double bc2_sqrt, double eps, bool maximize, double decay, double update_scale,
               double alpha, double tau_scale, double clamp, int64_t threshold, std::vector<int64_t> keys,
               int64_t offset, c10::optional<torch::Tensor> keep) {
  check(param, param, "param");
  check(grad, param, "grad");
  if (keep) check(*keep, param, "keep", at::kBool);
  check(exp_avg, param, "exp_avg");
  check(exp_avg_sq, param, "exp_avg_sq");
  const Merge mg = merge_of(decay, update_scale, alpha, tau_scale, clamp, threshold, keys, offset);
  // 1 − β in double, then rounded: what torch does with its Python-float scalars
  const float f[7] = {static_cast<float>(1.0 - beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                      static_cast<float>(step_size), static_cast<float>(bc2_sqrt), static_cast<float>(eps),
                      maximize ? -1.f : 1.f};
  if (max_exp_avg_sq) {
    check(*max_exp_avg_sq, param, "max_exp_avg_sq");
    const AdamRule<true> rule{grad.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                              max_exp_avg_sq->data_ptr<float>(), f[0], f[1], f[2], f[3], f[4], f[5], f[6]};
    return run_rule(mode, rule, param, tau, merge_buffer, scratch, keep, mg);
  }
  const AdamRule<false> rule{grad.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), nullptr,
                             f[0], f[1], f[2], f[3], f[4], f[5], f[6]};
  run_rule(mode, rule, param, tau, merge_buffer, scratch, keep, mg);
}

void sgd_pass(int64_t mode, torch::Tensor param, torch::Tensor grad, c10::optional<torch::Tensor> momentum_buffer,
              c10::optional<torch::Tensor> merge_buffer, c10::optional<torch::Tensor> tau,
              c10::optional<torch::Tensor> scratch, double lr, double momentum, double dampening, double weight_decay,
              bool nesterov, bool first, bool maximize, double update_scale, double alpha, double tau_scale,
              double clamp, int64_t threshold, std::vector<int64_t> keys, int64_t offset,
              c10::optional<torch::Tensor> keep) {
  check(param, param, "param");
  check(grad, param, "grad");
  if (keep) check(*keep, param, "keep", at::kBool);
  const Merge mg = merge_of(1.0, update_scale, alpha, tau_scale, clamp, threshold, keys, offset);
  const float f[5] = {static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                      static_cast<float>(weight_decay), maximize ? -1.f : 1.f};
  if (momentum_buffer) {
    check(*momentum_buffer, param, "momentum_buffer");
    const SgdRule<true> rule{grad.data_ptr<float>(), momentum_buffer->data_ptr<float>(), f[0], f[1], f[2], f[3], f[4],
                             nesterov ? 1.f : 0.f, first ? 1.f : 0.f};
    return run_rule(mode, rule, param, tau, merge_buffer, scratch, keep, mg);
  }
  const SgdRule<false> rule{grad.data_ptr<float>(), nullptr, f[0], f[1], f[2], f[3], f[4], 0.f, 0.f};
  run_rule(mode, rule, param, tau, merge_buffer, scratch, keep, mg);
}

std::vector<int64_t> topk_threshold_of(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(k >= 1 && k <= x.numel(), "k must be in [1, numel]");
  const auto cut = x.scalar_type() == at::kFloat ? topk_threshold(x.data_ptr<float>(), x.numel(), k)
                                                 : topk_threshold(x.data_ptr<c10::BFloat16>(), x.numel(), k);
  return {cut[0], cut[1]};
}

void ties_merge(torch::Tensor param, c10::optional<torch::Tensor> merge_buffer, torch::Tensor total, torch::Tensor tau,
                std::vector<int64_t> update_cut, std::vector<int64_t> tau_cut, double decay, double alpha,
                bool weighted, c10::optional<torch::Tensor> keep) {
  check(param, param, "param");
  check(total, param, "total");
  if (keep) check(*keep, param, "keep", at::kBool);
  const uint8_t* k = keep ? reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>()) : nullptr;
  TORCH_CHECK(tau.is_contiguous() && tau.numel() == param.numel(), "tau must be contiguous, shaped like param");
  float* buf = merge_buffer ? merge_buffer->data_ptr<float>() : nullptr;
  TORCH_CHECK(update_cut.size() == 2 && tau_cut.size() == 2, "cuts must be (T, cutoff)");
  for (const auto& cut : {update_cut, tau_cut}) {
    TORCH_CHECK(cut[0] >= 0 && cut[0] <= 0xFFFFFFFFll, "cut threshold must be a uint32 bit pattern");
    TORCH_CHECK(cut[1] >= -1 && cut[1] <= param.numel(), "cut cutoff must be a local index in [-1, numel]");
  }
  const std::array<int64_t, 2> uc{update_cut[0], update_cut[1]}, tc{tau_cut[0], tau_cut[1]};
  const float d = static_cast<float>(decay), a = static_cast<float>(alpha);
  auto run = [&](const auto* t) {
    float* p = param.data_ptr<float>();
    const float* x = total.data_ptr<float>();
    const int64_t n = param.numel();
    if (k) {
      if (buf) return ties_pass<true, true>(p, buf, x, t, k, d, a, uc, tc, weighted, n);
      return ties_pass<false, true>(p, buf, x, t, k, d, a, uc, tc, weighted, n);
    }
    if (buf) return ties_pass<true, false>(p, buf, x, t, k, d, a, uc, tc, weighted, n);
    ties_pass<false, false>(p, buf, x, t, k, d, a, uc, tc, weighted, n);
  };
  if (tau.scalar_type() == at::kFloat) {
    run(tau.data_ptr<float>());
  } else {
    run(tau.data_ptr<c10::BFloat16>());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_pass", &adam_pass, "Fused Adam update and online merge of one float32 tensor");
  m.def("sgd_pass", &sgd_pass, "Fused SGD update and online merge of one float32 tensor");
  m.def("topk_threshold", &topk_threshold_of, "Exact top-k |x| threshold: (T, tie cutoff index)");
  m.def("ties_merge", &ties_merge, "OnTIES merge pass over a precomputed total update");
}
