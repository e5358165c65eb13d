// The online-merging optimizer step on the CPU (float32 parameters): one call steps a param group's tensors.
//
// Each element is read once and written once: the Adam (or SGD) moments, the update Δ, the DARE keep decision
// from the counter-based hash (online_merging/rng.py), the merge with τ, weight decay and step-K.
// OnTIES needs the top-p threshold of the whole update first: a first pass writes Δ to a scratch buffer and, given
// a guess of the threshold (the tensor's last one), counts the elements above a bracket around it and collects
// those inside; the exact threshold is selected among them, or, when the bracket misses, by a selection over the
// scratch buffer; a second pass merges. The answer is the same whatever the guess.
// Element i's random bits, with g = offset + i its index in the whole parameter (the tensor may be a piece):
//   bits(g) = lowbias32(lo32(g) ^ k),  k = lowbias32(hi32(g) ^ k2) ^ k1,  kept iff bits < threshold.
// The loops are branch-free (modes and flags are template parameters) so that the compiler vectorises them; what
// they call is always inlined, which the many instantiations would otherwise exhaust GCC's inlining budget for.
// Masked updates (ALLO): with an element mask `keep` (bool per element, MASKED template flag), an element whose
// keep is false keeps θ and every state value (moments, momentum, step-K buffer) and counts as Δ = 0 in OnTIES's
// top-p; without one (MASKED = false) `on` is the constant true and the loops are the unmasked ones.
// The pull toward the SFT model (PULL template parameter, a slot with an anchor θ_sft): P = λ·(θ_sft − θ), θ before
// the step, joins the merged update F where ``pull_elements`` says (see with_pull); OnTIES adds it in its merge
// pass, which reads θ before the step as well.
// A tensor is stepped whole by one thread (the threads take the group's tensors in turn) when it is small (below
// kWhole elements) or a small share of the group (at most 1/(4·threads), and at most kWholeMax elements, which
// bounds each thread's OnTIES scratch buffer): its passes then stay in the thread's caches. Other tensors are
// stepped one after another, each split over the threads.

#include <torch/extension.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kWhole = 1 << 19;
constexpr int64_t kWholeMax = 1 << 24;
constexpr int64_t kPackBlock = 1024;  // a packed τ's block, whose first kept value's index it stores (PACK_BLOCK)
constexpr int64_t kUnpackBlocks = 2;  // blocks of a packed τ unpacked at a time, into a per-thread buffer (8 KiB)
constexpr int64_t kScanBlock = 1 << 12;  // OnTIES's first pass scans each block of Δ just written, while in L1

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
inline int sign(float x) { return (x > 0.f) - (x < 0.f); }  // 0 for ±0 and NaN

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
  kDare = 1,             // θ ← decay·θ + (1−α)·R(Δ) + α·clamp(R(τ)); weights (1−α), α: the plan's
  kAccumulate = 2,       // step-K between merges: θ ← decay·θ + Δ, Δc ← Δc + Δ
  kDareMerge = 3,        // step-K merge: θ ← decay·θ − Δc + (1−α)·R(Δc + Δ) + α·clamp(R(τ)), Δc ← 0
  kWriteTotal = 4,       // OnTIES's first pass of a piece, whose cut is the whole tensor's: total ← Δ
  kWriteTotalMerge = 5,  // the same on a step-K merge step: total ← Δc + Δ
  kTies = 6,             // OnTIES of a whole tensor: both passes and the selection between them
  kTiesMerge = 7,        // the same on a step-K merge step
};

// What became of an OnTIES guess.
enum Guess : int { kNone = 0, kHit = 1, kMissed = 2, kTooWide = 3 };

// The group's constants.
struct Group {
  bool adam, amsgrad, momentum_on, weighted;
  float one_minus_beta1, beta2, one_minus_beta2, eps;                    // Adam
  float lr, momentum, one_minus_dampening, weight_decay, nesterov;       // SGD (nesterov 0/1)
  float grad_sign, decay, clamp;                                         // clamp = +inf: none
  float update_weight, tau_weight;                                       // the merge's weights of Δ and τ
  float update_scale, tau_scale;                                         // DARE's: its weight times 1/p, and 1/p
  uint32_t threshold;                                                    // DARE keeps bits below it
  bool keep_all;
  float pull;                                                            // λ of the pull toward θ_sft
  bool pull_all, pull_consensus;                                         // pull_elements "all", "consensus"
};

// One tensor (a parameter or a piece of one); state it does not use is null.
struct Slot {
  float* param;
  const float* grad;
  float* state1;  // exp_avg, or SGD's momentum buffer
  float* state2;  // exp_avg_sq
  float* state3;  // max_exp_avg_sq
  float* buffer;  // step-K's Δc
  const void* tau;                // dense, or a packed τ's kept values
  bool tau_bf16;
  const uint8_t* tau_bits;        // a packed τ's bitmask, or null: it places its values by positions
  const int64_t* tau_starts;      // a packed τ's block starts, or null: τ is dense
  const int16_t* tau_positions;   // a packed τ's kept elements' positions in their blocks
  const uint8_t* keep;
  float* total;         // a piece's Δ, for OnTIES's cut of the whole tensor
  const float* anchor;  // θ_sft, or null: no pull
  int64_t n;
  int mode;
  uint32_t k1u, k2u, k1t, k2t;  // keys of the update's and τ's draws
  int64_t offset;                // global flat index of element 0
  float step_size, bc2_sqrt;     // Adam's bias corrections at this tensor's step
  float first;                   // SGD: 1 on the momentum buffer's first step
  int64_t k;                     // OnTIES of a whole tensor: elements of Δ kept
  std::array<int64_t, 2> tau_cut;
  float guess, width;  // OnTIES: a guess of Δ's threshold value (0 or NaN: none), bracketed by ±width·guess
  float found;         // Δ's threshold value, selected
  int guessed;         // what became of the guess: a Guess
};

// What pull_elements is in the C++ call.
enum PullElements : int { kPullAll = 0, kPullKept = 1, kPullConsensus = 2 };
// The PULL template parameter: none, F + P where added, their sign consensus.
enum Pull : int { kNoPull = 0, kAddPull = 1, kConsensusPull = 2 };

// F + P as eager.with_pull: kAddPull, F + P where `add` (every element for "all", those the update's sparsification
// kept for "kept"); kConsensusPull, TIES's sign consensus of F and P, + 0·F, where the sign elected from a NaN sum
// (NaN in torch) is one no sign equals: nothing is kept there.
template <int PULL>
[[gnu::always_inline]] inline float with_pull(float f, float p, bool add) {
  if (PULL == kAddPull) return f + (add ? p : 0.f);
  const float sum = f + p;
  const int elected = sign(sum);
  const bool voted = sum == sum;
  return ((voted & (sign(f) == elected) ? f : 0.f) + (voted & (sign(p) == elected) ? p : 0.f)) + f * 0.f;
}

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
  [[gnu::always_inline]] inline float operator()(int64_t i, float, uint32_t on) const {
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

  [[gnu::always_inline]] inline float operator()(int64_t i, float theta, uint32_t on) const {
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

// UNPACKED: τ comes from a packed τ's buffer, 0 where it keeps none: no draw of its mask is needed.
template <int MODE, bool MASKED, int PULL, bool UNPACKED = false, typename Rule, typename T>
void fused_range(const Rule& rule_, const Group& g, const Slot& s, const T* __restrict__ tau,
                 float* __restrict__ out, int64_t begin, int64_t end) {
  // Local copies: loop invariants the compiler can keep in registers (stores to param could alias them).
  const Rule rule = rule_;
  float* __restrict__ param = s.param;
  float* __restrict__ buffer = s.buffer;
  const uint8_t* __restrict__ keep = s.keep;
  const float* __restrict__ anchor = s.anchor;
  const float decay = g.decay, update_scale = g.update_scale, alpha = g.tau_weight, tau_scale = g.tau_scale;
  const float clamp = g.clamp, pull = g.pull;
  const uint32_t threshold = g.threshold;
  const bool keep_all = g.keep_all, pull_all = g.pull_all;
  const int64_t offset = s.offset;
  for (int64_t lo = begin; lo < end;) {
    const uint32_t hi = static_cast<uint32_t>((offset + lo) >> 32);
    // Ranges stay inside one 2**32 block of global indices (one key) and below 2**31 elements (32-bit counter).
    const int64_t block_end = ((static_cast<int64_t>(hi) + 1) << 32) - offset;
    const int64_t range_end = std::min({end, block_end, lo + (int64_t(1) << 31)});
    const uint32_t ku = mix32(hi ^ s.k2u) ^ s.k1u;
    const uint32_t kt = mix32(hi ^ s.k2t) ^ s.k1t;
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
        out[i] = MODE == kWriteTotalMerge ? pick(on, buffer[i] + delta, 0.f) : delta;
        continue;
      }
      float theta = old * decay;
      const float p = PULL != kNoPull ? (anchor[i] - old) * pull : 0.f;
      if (MODE == kPlain || MODE == kAccumulate) {
        theta += PULL != kNoPull ? with_pull<PULL>(delta, p, true) : delta;
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
        const bool keep_tau = UNPACKED || (mix32(index ^ kt) < threshold) | keep_all;
        const float t = std::min(std::max(to_float(tau[i]) * tau_scale, -clamp), clamp);
        // + 0·total: a non-finite update reaches θ even where DARE drops it (as eager.merge_update)
        const float merged = ((keep_update ? total * update_scale : 0.f) + (keep_tau ? alpha * t : 0.f)) + total * 0.f;
        theta += PULL != kNoPull ? with_pull<PULL>(merged, p, keep_update | pull_all) : merged;
      }
      param[i] = pick(on, theta, old);
    }
    lo = range_end;
  }
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

// What a scan of x against a bracket [low, high] of magnitude bits found: the elements above it, those inside.
struct Scan {
  int64_t above = 0;
  std::vector<std::pair<uint32_t, int64_t>> inside;
  bool overflow = false;  // more than the cap inside: not worth selecting from
};

// Collects the elements of x[i, i + lanes) flagged in `inside` (bit j: element i + j); false past the cap.
template <typename X>
bool collect(const X* x, int64_t i, uint32_t inside, int64_t cap, Scan& scan) {
  for (; inside != 0; inside &= inside - 1) {
    const int j = __builtin_ctz(inside);
    scan.inside.emplace_back(abs_bits(x, i + j), i + j);
  }
  scan.overflow = static_cast<int64_t>(scan.inside.size()) > cap;
  return !scan.overflow;
}

// Counts the elements of x[begin, end) whose magnitude bits are above `high`, collects those in [low, high]; stops
// collecting past `cap` (``scan.overflow``). Vectors of lanes are compared at once and only a vector with an
// element inside the bracket (rare) is looked into, by its bit mask. Magnitude bits are below 2**31, so signed
// and unsigned comparisons agree.
template <typename X>
void scan_range(const X* x, int64_t begin, int64_t end, uint32_t low, uint32_t high, int64_t cap, Scan& scan) {
  const uint32_t span = high - low;  // b in [low, high] iff b − low <= span, unsigned
  int64_t i = begin;
  if constexpr (std::is_same_v<X, float>) {
#if defined(__AVX512F__)
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), vlow = _mm512_set1_epi32(static_cast<int>(low)),
                  vspan = _mm512_set1_epi32(static_cast<int>(span)), vhigh = _mm512_set1_epi32(static_cast<int>(high));
    for (; i + 16 <= end; i += 16) {
      const __m512i b = _mm512_and_si512(_mm512_loadu_si512(x + i), magnitude);
      scan.above += __builtin_popcount(_mm512_cmpgt_epu32_mask(b, vhigh));
      const uint32_t inside = _mm512_cmple_epu32_mask(_mm512_sub_epi32(b, vlow), vspan);
      if (inside != 0 && !collect(x, i, inside, cap, scan)) return;
    }
#elif defined(__AVX2__)
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), below = _mm256_set1_epi32(static_cast<int>(low) - 1),
                  vhigh = _mm256_set1_epi32(static_cast<int>(high));
    for (; i + 8 <= end; i += 8) {
      const __m256i b = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), magnitude);
      const __m256i over = _mm256_cmpgt_epi32(b, vhigh);
      scan.above += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(over)));
      const __m256i inside = _mm256_andnot_si256(over, _mm256_cmpgt_epi32(b, below));
      const uint32_t mask = _mm256_movemask_ps(_mm256_castsi256_ps(inside));
      if (mask != 0 && !collect(x, i, mask, cap, scan)) return;
    }
#endif
  }
  for (int64_t block = i; block < end; block += 32) {  // counts vectorised by the compiler, 32 lanes at a time
    const int64_t lanes = std::min<int64_t>(end - block, 32);
    uint32_t above = 0, inside = 0;
    for (int64_t j = 0; j < lanes; ++j) {
      const uint32_t b = abs_bits(x, block + j);
      above += b > high;
      inside |= static_cast<uint32_t>(b - low <= span) << j;
    }
    scan.above += above;
    if (inside != 0 && !collect(x, block, inside, cap, scan)) return;
  }
}

// The top-k cut {T, cutoff} from scans of all of x, when the k-th element fell inside their bracket.
std::optional<std::array<int64_t, 2>> resolve(std::vector<Scan>& scans, int64_t k) {
  int64_t above = 0;
  std::vector<std::pair<uint32_t, int64_t>> candidates;
  for (auto& scan : scans) {
    if (scan.overflow) return std::nullopt;
    above += scan.above;
    candidates.insert(candidates.end(), scan.inside.begin(), scan.inside.end());
  }
  if (above < k && k <= above + static_cast<int64_t>(candidates.size())) return pick(candidates, k - above - 1);
  return std::nullopt;
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
  std::vector<Scan> scans(at::get_num_threads());
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    scan_range(x, begin, end, low, high, cap, scans[at::get_thread_num()]);
  });
  if (auto cut = resolve(scans, k)) return *cut;
  return radix_select(x, n, k);
}

// θ ← decay·θ − Δc + (1−α)·a' + α·b' [with the pull], with a = T(total), b = T(τ) and a', b' their elements that
// agree with the elected sign; Δc ← 0. ``total`` is Δc + Δ from the first pass. The cuts are in local indices: a
// piece's caller shifts the whole tensor's cutoff by the piece's offset and clamps it to [-1, n].
// UNPACKED: τ comes from a packed τ's buffer, 0 where its cut keeps none: τ's cut need not be compared.
template <bool BUFFER, bool MASKED, int PULL, bool UNPACKED = false, typename T>
void ties_range(const Group& g, const Slot& s, const T* __restrict__ tau, const float* __restrict__ total,
                std::array<int64_t, 2> update_cut, std::array<int64_t, 2> tau_cut, int64_t begin, int64_t end) {
  float* __restrict__ param = s.param;
  float* __restrict__ buffer = s.buffer;
  const uint8_t* __restrict__ keep = s.keep;
  const float* __restrict__ anchor = s.anchor;
  const float decay = g.decay, wu = g.update_weight, wt = g.tau_weight, pull = g.pull;
  const bool pull_all = g.pull_all;
  const uint32_t update_threshold = static_cast<uint32_t>(update_cut[0]);
  const uint32_t tau_threshold = static_cast<uint32_t>(tau_cut[0]);
  const float wa = g.weighted ? wu : 1.f, wb = g.weighted ? wt : 1.f;
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
      const bool keep_t = UNPACKED || (tb > tau_threshold) | ((tb == tau_threshold) & (j < tau_ties));
      const float a = keep_x ? x : 0.f;
      const float b = keep_t ? t : 0.f;
      const int sgn = sign(wa * a + wb * b);
      const float consensus = wu * (sign(a) == sgn ? a : 0.f) + wt * (sign(b) == sgn ? b : 0.f);
      const uint32_t on = on_bits<MASKED>(keep, i);
      const float old = param[i];
      const float pulled =
          PULL != kNoPull ? with_pull<PULL>(consensus, (anchor[i] - old) * pull, keep_x | pull_all) : consensus;
      const float merged = pulled + x * 0.f;  // 0·x: see DARE
      float theta = old * decay;  // (decay·θ − Δc) + merged, in eager's order
      if (BUFFER) {
        const float accumulated = buffer[i];
        theta -= accumulated;
        buffer[i] = pick(on, 0.f, accumulated);
      }
      param[i] = pick(on, theta + merged, old);
    }
    lo = range_end;
  }
}

// Calls f with the slot's update rule.
template <typename F>
void with_rule(const Group& g, const Slot& s, F&& f) {
  if (g.adam) {
    if (g.amsgrad)
      return f(AdamRule<true>{s.grad, s.state1, s.state2, s.state3, g.one_minus_beta1, g.beta2, g.one_minus_beta2,
                              s.step_size, s.bc2_sqrt, g.eps, g.grad_sign});
    return f(AdamRule<false>{s.grad, s.state1, s.state2, nullptr, g.one_minus_beta1, g.beta2, g.one_minus_beta2,
                             s.step_size, s.bc2_sqrt, g.eps, g.grad_sign});
  }
  if (g.momentum_on)
    return f(SgdRule<true>{s.grad, s.state1, g.lr, g.momentum, g.one_minus_dampening, g.weight_decay, g.grad_sign,
                           g.nesterov, s.first});
  f(SgdRule<false>{s.grad, nullptr, g.lr, 0.f, 0.f, g.weight_decay, g.grad_sign, 0.f, 0.f});
}

// Writes into `out` the elements of block `block` of a packed τ (kPackBlock elements from block·kPackBlock), 0
// where it keeps none: its kept values, placed by their positions in the block, or in order by its bitmask, read
// 64 bits at a time (work in proportion to the kept elements).
template <typename T>
void unpack_block(const Slot& s, const T* __restrict__ values, int64_t block, float* __restrict__ out) {
  const int64_t first = block * kPackBlock, count = std::min(kPackBlock, s.n - first);
  const int64_t begin = s.tau_starts[block], end = s.tau_starts[block + 1];
  if (!s.tau_bits) {  // by positions (which may be none at all: a null pointer)
    std::fill(out, out + count, 0.f);
    for (int64_t k = begin; k < end; ++k) out[s.tau_positions[k]] = to_float(values[k]);
    return;
  }
  const T* next = values + begin;
  const uint8_t* bits = s.tau_bits + first / 8;
  const int64_t bytes = (count + 7) / 8;  // the bits past the tensor's end are 0
  std::fill(out, out + count, 0.f);
  for (int64_t byte = 0; byte < bytes; byte += 8) {
    uint64_t word = 0;  // little-endian: bit j of byte i is bit 8i + j of the word
    std::memcpy(&word, bits + byte, std::min<int64_t>(8, bytes - byte));
    for (; word != 0; word &= word - 1) out[byte * 8 + __builtin_ctzll(word)] = to_float(*next++);
  }
}

// Calls f(tau, lo, hi, unpacked) over [begin, end) with the slot's τ as a pointer read at the tensor's element
// indices: its dense τ, typed, once (unpacked: std::false_type); a packed τ in chunks of kUnpackBlocks blocks, each
// unpacked into this thread's float buffer (std::true_type).
template <typename F>
void with_tau(const Group& g, const Slot& s, int64_t begin, int64_t end, F&& f) {
  if (!s.tau_starts) {
    if (s.tau_bf16) return f(static_cast<const c10::BFloat16*>(s.tau), begin, end, std::false_type{});
    return f(static_cast<const float*>(s.tau), begin, end, std::false_type{});
  }
  thread_local std::array<float, kUnpackBlocks * kPackBlock> buffer;
  for (int64_t lo = begin; lo < end;) {
    const int64_t first = lo / kPackBlock, last = std::min((end - 1) / kPackBlock + 1, first + kUnpackBlocks);
    for (int64_t block = first; block < last; ++block) {
      float* into = buffer.data() + (block - first) * kPackBlock;
      if (s.tau_bf16) unpack_block(s, static_cast<const c10::BFloat16*>(s.tau), block, into);
      else unpack_block(s, static_cast<const float*>(s.tau), block, into);
    }
    const int64_t hi = std::min(end, last * kPackBlock);
    f(static_cast<const float*>(buffer.data()) - first * kPackBlock, lo, hi, std::true_type{});
    lo = hi;
  }
}

// Calls f with std::true_type when the slot is masked, else std::false_type.
template <typename F>
void with_mask(const Slot& s, F&& f) {
  if (s.keep) return f(std::true_type{});
  f(std::false_type{});
}

// Calls f with the slot's pull as a std::integral_constant (kNoPull without an anchor).
template <typename F>
void with_pull_of(const Group& g, const Slot& s, F&& f) {
  if (!s.anchor) return f(std::integral_constant<int, kNoPull>{});
  if (g.pull_consensus) return f(std::integral_constant<int, kConsensusPull>{});
  f(std::integral_constant<int, kAddPull>{});
}

// The first pass of elements [begin, end) in `mode` (kTies and kTiesMerge: their first pass, writing Δ to out).
void pass_range(const Group& g, const Slot& s, int mode, float* out, int64_t begin, int64_t end) {
  with_rule(g, s, [&](const auto& rule) {
    with_mask(s, [&](auto masked) {
      with_pull_of(g, s, [&](auto pulled) {
        constexpr bool M = decltype(masked)::value;
        constexpr int P = decltype(pulled)::value;
        const float* none = nullptr;
        switch (mode) {
          case kPlain: return fused_range<kPlain, M, P>(rule, g, s, none, out, begin, end);
          case kAccumulate: return fused_range<kAccumulate, M, P>(rule, g, s, none, out, begin, end);
          case kWriteTotal:  // θ is not written: no pull
          case kTies: return fused_range<kWriteTotal, M, kNoPull>(rule, g, s, none, out, begin, end);
          case kWriteTotalMerge:
          case kTiesMerge: return fused_range<kWriteTotalMerge, M, kNoPull>(rule, g, s, none, out, begin, end);
          case kDare:
            return with_tau(g, s, begin, end, [&](auto t, int64_t lo, int64_t hi, auto unpacked) {
              fused_range<kDare, M, P, decltype(unpacked)::value>(rule, g, s, t, out, lo, hi);
            });
          case kDareMerge:
            return with_tau(g, s, begin, end, [&](auto t, int64_t lo, int64_t hi, auto unpacked) {
              fused_range<kDareMerge, M, P, decltype(unpacked)::value>(rule, g, s, t, out, lo, hi);
            });
        }
      });
    });
  });
}

void merge_range(const Group& g, const Slot& s, const float* total, std::array<int64_t, 2> update_cut,
                 std::array<int64_t, 2> tau_cut, bool roll_back, int64_t begin, int64_t end) {
  with_tau(g, s, begin, end, [&](auto t, int64_t lo, int64_t hi, auto unpacked) {
    with_mask(s, [&](auto masked) {
      with_pull_of(g, s, [&](auto pulled) {
        constexpr bool M = decltype(masked)::value;
        constexpr int P = decltype(pulled)::value;
        constexpr bool U = decltype(unpacked)::value;
        if (roll_back) return ties_range<true, M, P, U>(g, s, t, total, update_cut, tau_cut, lo, hi);
        ties_range<false, M, P, U>(g, s, t, total, update_cut, tau_cut, lo, hi);
      });
    });
  });
}

// f over [0, n): split over the threads, or in this thread.
template <typename F>
void over(bool split, int64_t n, const F& f) {
  if (split) return at::parallel_for(0, n, kGrain, f);
  f(0, n);
}

uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// A reused scratch buffer per thread: a fresh one per step page-faults every 4 KiB.
float* scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// The bracket [low, high] of magnitude bits around a guessed threshold value, ±width of it; none without a guess.
std::optional<std::array<uint32_t, 2>> bracket(float guess, float width) {
  if (!(std::isfinite(guess) && guess > 0.f)) return std::nullopt;
  return std::array<uint32_t, 2>{float_bits(std::max(0.f, guess * (1.f - width))), float_bits(guess * (1.f + width))};
}

// Scans of a guess's bracket stop collecting past this many candidates: too wide a bracket to select from.
int64_t bracket_cap(int64_t k) { return k + 4096; }

// The cut of the top k of |x|: among what scans against a guess's bracket found, else by topk_threshold; `guessed`:
// what became of the guess.
template <typename X>
std::array<int64_t, 2> select(std::vector<Scan>& scans, bool scanned, const X* x, int64_t n, int64_t k, int& guessed) {
  guessed = kNone;
  if (scanned) {
    if (auto cut = resolve(scans, k)) {
      guessed = kHit;
      return *cut;
    }
    const bool wide = std::any_of(scans.begin(), scans.end(), [](const Scan& scan) { return scan.overflow; });
    guessed = wide ? kTooWide : kMissed;
  }
  return topk_threshold(x, n, k);
}

// OnTIES of a whole tensor: Δ into the scratch buffer, scanned against the bracket of the slot's guess; the cut of
// its top k; the merge.
void ties_whole(const Group& g, Slot& s, bool split) {
  const int64_t n = s.n;
  float* total = scratch(n);
  const auto range = s.k < n ? bracket(s.guess, s.width) : std::nullopt;
  const int64_t cap = bracket_cap(s.k);
  std::vector<Scan> scans(split ? at::get_num_threads() : 1);
  over(split, n, [&](int64_t begin, int64_t end) {
    Scan& scan = scans[split ? at::get_thread_num() : 0];
    for (int64_t lo = begin; lo < end; lo += kScanBlock) {
      const int64_t hi = std::min(end, lo + kScanBlock);
      pass_range(g, s, s.mode, total, lo, hi);
      if (range) scan_range(total, lo, hi, (*range)[0], (*range)[1], cap, scan);
    }
  });
  std::array<int64_t, 2> cut{0, n};  // k = n: every element
  if (s.k < n) {
    cut = select(scans, range.has_value(), total, n, s.k, s.guessed);
    uint32_t bits = static_cast<uint32_t>(cut[0]);
    std::memcpy(&s.found, &bits, sizeof bits);
  }
  over(split, n, [&](int64_t begin, int64_t end) {
    merge_range(g, s, total, cut, s.tau_cut, s.mode == kTiesMerge, begin, end);
  });
}

void step_slot(const Group& g, Slot& s, bool split) {
  if (s.mode == kTies || s.mode == kTiesMerge) return ties_whole(g, s, split);
  over(split, s.n, [&](int64_t begin, int64_t end) { pass_range(g, s, s.mode, s.total, begin, end); });
}

float* data_or_null(const c10::optional<torch::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

}  // namespace

using Tensors = std::vector<c10::optional<torch::Tensor>>;
constexpr size_t kTensors = 13;  // per tensor: param, grad, 3 states, step-K buffer, τ, keep mask, total, anchor,
                                 // a packed τ's bitmask, block starts and positions
constexpr size_t kInts = 9;      // per tensor: mode, offset, 4 keys, k, τ's cut (T, cutoff)
constexpr size_t kFloats = 5;    // per tensor: step size, √(1 − β2^t), first momentum step, guess, its width

// Whether this kernel can read and write a tensor given as these kTensors entries: every one that is given (param
// must be) contiguous, on the CPU, float32 (τ float32 or bfloat16, the keep mask bool) and shaped like param; an
// anchor too (θ_sft, in the param's dtype); a packed τ (its block starts given): its values, ⌈n/kPackBlock⌉ + 1
// int64 block starts, and a uint8 bitmask of ⌈n/8⌉ bytes or an int16 position per value.
bool fusable(const c10::optional<torch::Tensor>* t) {
  if (!t[0] || t[0]->numel() == 0) return false;
  const int64_t n = t[0]->numel();
  const bool packed = t[11].has_value();
  if (packed != (t[10].has_value() != t[12].has_value())) return false;
  for (size_t j = 0; j < kTensors; ++j) {
    if (!t[j]) continue;
    const auto type = t[j]->scalar_type();
    const bool typed = j == 6    ? type == at::kFloat || type == at::kBFloat16
                       : j == 7  ? type == at::kBool
                       : j == 10 ? type == at::kByte
                       : j == 11 ? type == at::kLong
                       : j == 12 ? type == at::kShort
                                 : type == at::kFloat;
    const int64_t size = j == 10   ? (n + 7) / 8
                         : j == 11 ? (n + kPackBlock - 1) / kPackBlock + 1
                         : j == 12 ? t[6]->numel()
                                   : n;
    const bool sized = t[j]->numel() == size || (j == 6 && packed);
    if (!typed || !t[j]->is_contiguous() || !t[j]->device().is_cpu() || !sized) return false;
  }
  return true;
}

const uint8_t* bytes_or_null(const c10::optional<torch::Tensor>& t) { return t ? t->data_ptr<uint8_t>() : nullptr; }
const int64_t* longs_or_null(const c10::optional<torch::Tensor>& t) { return t ? t->data_ptr<int64_t>() : nullptr; }
const int16_t* shorts_or_null(const c10::optional<torch::Tensor>& t) { return t ? t->data_ptr<int16_t>() : nullptr; }

// Steps a param group's tensors (``tensors``: kTensors entries each) except those it cannot (see ``fusable``);
// returns, per tensor, the OnTIES threshold value selected (NaN: none), what became of its guess (a Guess), and
// whether it was stepped.
std::tuple<std::vector<double>, std::vector<int64_t>, std::vector<bool>> step_group(
    bool adam, Tensors tensors, std::vector<int64_t> ints, std::vector<double> floats, double beta1, double beta2,
    double eps, bool amsgrad, double lr, double momentum, double dampening, double weight_decay, bool nesterov,
    bool maximize, double decay, double update_weight, double tau_weight, double dare_scale, double clamp,
    int64_t threshold, bool weighted, double pull, int64_t pull_elements) {
  const size_t count = tensors.size() / kTensors;
  TORCH_CHECK(tensors.size() == kTensors * count && ints.size() == kInts * count && floats.size() == kFloats * count,
              kTensors, " tensors, ", kInts, " ints and ", kFloats, " floats per parameter");
  const bool keep_all = threshold >= (int64_t(1) << 32);
  // 1 − β in double, then rounded: what torch does with its Python-float scalars
  const Group g{adam, amsgrad, momentum != 0.0, weighted,
                static_cast<float>(1.0 - beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                static_cast<float>(eps), static_cast<float>(lr), static_cast<float>(momentum),
                static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay), nesterov ? 1.f : 0.f,
                maximize ? -1.f : 1.f, static_cast<float>(decay), clamp > 0 ? static_cast<float>(clamp) : INFINITY,
                static_cast<float>(update_weight), static_cast<float>(tau_weight),
                static_cast<float>(update_weight * dare_scale), static_cast<float>(dare_scale),
                keep_all ? 0u : static_cast<uint32_t>(threshold), keep_all, static_cast<float>(pull),
                pull_elements == kPullAll, pull_elements == kPullConsensus};
  TORCH_CHECK(pull_elements >= kPullAll && pull_elements <= kPullConsensus, "unknown pull_elements ", pull_elements);
  std::vector<Slot> slots;
  std::vector<size_t> stepped_index;
  std::vector<bool> stepped(count, false);
  for (size_t i = 0; i < count; ++i) {
    const c10::optional<torch::Tensor>* t = &tensors[kTensors * i];
    if (!t[1] || !fusable(t)) continue;
    const int64_t n = t[0]->numel();
    const int64_t* in = &ints[kInts * i];
    const double* fl = &floats[kFloats * i];
    const int mode = static_cast<int>(in[0]);
    TORCH_CHECK(mode >= kPlain && mode <= kTiesMerge, "tensor ", i, ": unknown mode ", mode);
    TORCH_CHECK(!adam || (t[2] && t[3] && (t[4] || !amsgrad)), "tensor ", i, ": Adam's moments missing");
    TORCH_CHECK(!g.momentum_on || adam || t[2], "tensor ", i, ": SGD's momentum buffer missing");
    const bool merges = mode == kDare || mode == kDareMerge || mode >= kTies;
    const bool carries = mode == kAccumulate || mode == kDareMerge || mode == kWriteTotalMerge || mode == kTiesMerge;
    TORCH_CHECK(!merges || t[6], "tensor ", i, ": this mode merges tau, none given");
    TORCH_CHECK(!carries || t[5], "tensor ", i, ": step-K needs a merge_buffer");
    TORCH_CHECK(!(mode == kWriteTotal || mode == kWriteTotalMerge) || t[8], "tensor ", i, ": no total");
    TORCH_CHECK(in[1] >= 0, "tensor ", i, ": offset must be >= 0");
    if (mode >= kTies) {
      TORCH_CHECK(in[6] >= 1 && in[6] <= n, "tensor ", i, ": k must be in [1, numel]");
      TORCH_CHECK(in[7] >= 0 && in[7] <= 0xFFFFFFFFll && in[8] >= -1 && in[8] <= n,
                  "tensor ", i, ": tau's cut must be a uint32 threshold and a local cutoff in [-1, numel]");
    }
    stepped[i] = true;
    stepped_index.push_back(i);
    slots.push_back(Slot{t[0]->data_ptr<float>(), t[1]->data_ptr<float>(), data_or_null(t[2]), data_or_null(t[3]),
                         data_or_null(t[4]), data_or_null(t[5]), t[6] ? t[6]->data_ptr() : nullptr,
                         t[6] && t[6]->scalar_type() == at::kBFloat16, bytes_or_null(t[10]), longs_or_null(t[11]),
                         shorts_or_null(t[12]),
                         t[7] ? reinterpret_cast<const uint8_t*>(t[7]->data_ptr<bool>()) : nullptr,
                         data_or_null(t[8]), data_or_null(t[9]), n, mode,
                         static_cast<uint32_t>(in[2]), static_cast<uint32_t>(in[3]), static_cast<uint32_t>(in[4]),
                         static_cast<uint32_t>(in[5]), in[1], static_cast<float>(fl[0]), static_cast<float>(fl[1]),
                         static_cast<float>(fl[2]), in[6], {in[7], in[8]}, static_cast<float>(fl[3]),
                         static_cast<float>(fl[4]), NAN, kNone});
  }
  std::vector<size_t> small, large;
  int64_t numel = 0;
  for (const Slot& slot : slots) numel += slot.n;
  const int64_t share = numel / (4 * at::get_num_threads());
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t n = slots[i].n;
    (n < kWhole || (n <= share && n <= kWholeMax) ? small : large).push_back(i);
  }
  std::atomic<size_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (size_t j; (j = next.fetch_add(1)) < small.size();) step_slot(g, slots[small[j]], false);
  });
  for (size_t i : large) step_slot(g, slots[i], true);
  std::vector<double> found(count, NAN);
  std::vector<int64_t> guessed(count, kNone);
  for (size_t j = 0; j < slots.size(); ++j) {
    found[stepped_index[j]] = slots[j].found;
    guessed[stepped_index[j]] = slots[j].guessed;
  }
  return {found, guessed, stepped};
}

// OnTIES's merge of a piece whose Δ (``total``) and cuts (local indices) are known; false, changing nothing, for
// tensors this kernel cannot read or write (see ``fusable``).
bool ties_merge(torch::Tensor param, c10::optional<torch::Tensor> merge_buffer, torch::Tensor total, torch::Tensor tau,
                std::vector<int64_t> update_cut, std::vector<int64_t> tau_cut, double decay, double update_weight,
                double tau_weight, bool weighted, c10::optional<torch::Tensor> keep,
                c10::optional<torch::Tensor> anchor, double pull, int64_t pull_elements,
                c10::optional<torch::Tensor> tau_bits, c10::optional<torch::Tensor> tau_starts,
                c10::optional<torch::Tensor> tau_positions) {
  const c10::optional<torch::Tensor> tensors[kTensors] = {param, {}, {}, {}, {}, merge_buffer, tau, keep, total,
                                                          anchor, tau_bits, tau_starts, tau_positions};
  if (!fusable(tensors)) return false;
  const int64_t n = param.numel();
  TORCH_CHECK(update_cut.size() == 2 && tau_cut.size() == 2, "cuts must be (T, cutoff)");
  TORCH_CHECK(pull_elements >= kPullAll && pull_elements <= kPullConsensus, "unknown pull_elements ", pull_elements);
  for (const auto& cut : {update_cut, tau_cut}) {
    TORCH_CHECK(cut[0] >= 0 && cut[0] <= 0xFFFFFFFFll, "cut threshold must be a uint32 bit pattern");
    TORCH_CHECK(cut[1] >= -1 && cut[1] <= n, "cut cutoff must be a local index in [-1, numel]");
  }
  Group g{};
  g.decay = static_cast<float>(decay);
  g.update_weight = static_cast<float>(update_weight);
  g.tau_weight = static_cast<float>(tau_weight);
  g.weighted = weighted;
  g.pull = static_cast<float>(pull);
  g.pull_all = pull_elements == kPullAll;
  g.pull_consensus = pull_elements == kPullConsensus;
  Slot s{};
  s.param = param.data_ptr<float>();
  s.buffer = data_or_null(merge_buffer);
  s.tau = tau.data_ptr();
  s.tau_bf16 = tau.scalar_type() == at::kBFloat16;
  s.tau_bits = bytes_or_null(tau_bits);
  s.tau_starts = longs_or_null(tau_starts);
  s.tau_positions = shorts_or_null(tau_positions);
  s.keep = keep ? reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>()) : nullptr;
  s.anchor = data_or_null(anchor);
  s.n = n;
  const float* x = total.data_ptr<float>();
  const std::array<int64_t, 2> uc{update_cut[0], update_cut[1]}, tc{tau_cut[0], tau_cut[1]};
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    merge_range(g, s, x, uc, tc, merge_buffer.has_value(), begin, end);
  });
  return true;
}

// (T, cutoff) of the top k of |x|, given a guess of its threshold value as OnTIES's first pass is (NaN: none), and
// what became of the guess (a Guess).
std::vector<int64_t> topk_threshold_of(torch::Tensor x, int64_t k, double guess, double width) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(k >= 1 && k <= x.numel(), "k must be in [1, numel]");
  const int64_t n = x.numel();
  const auto range = bracket(static_cast<float>(guess), static_cast<float>(width));
  std::vector<Scan> scans(at::get_num_threads());
  int guessed = kNone;
  auto run = [&](const auto* data) {
    if (range)
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        scan_range(data, begin, end, (*range)[0], (*range)[1], bracket_cap(k), scans[at::get_thread_num()]);
      });
    return select(scans, range.has_value(), data, n, k, guessed);
  };
  const auto cut = x.scalar_type() == at::kFloat ? run(x.data_ptr<float>()) : run(x.data_ptr<c10::BFloat16>());
  return {cut[0], cut[1], guessed};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step_group", &step_group, "The fused optimizer step and online merge of a param group's float32 tensors",
        py::arg("adam"), py::arg("tensors"), py::arg("ints"), py::arg("floats"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("amsgrad"), py::arg("lr"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("decay"),
        py::arg("update_weight"), py::arg("tau_weight"), py::arg("dare_scale"), py::arg("clamp"), py::arg("threshold"),
        py::arg("weighted"), py::arg("pull"), py::arg("pull_elements"));
  m.def("topk_threshold", &topk_threshold_of, "Exact top-k |x| threshold: (T, tie cutoff index, guess)", py::arg("x"),
        py::arg("k"), py::arg("guess") = NAN, py::arg("width") = 0.0);
  m.def("ties_merge", &ties_merge,
        "OnTIES merge pass of a float32 tensor over its precomputed total update; false when it cannot step it");
}
