// Shared pieces of the C++ CPU distillation-loss ops (kd_loss.cpp, kd_loss_linear.cpp, kd_catalog_local.cpp).
//
// The loss is defined in /work/shared/specs/kd-loss.md and by prmkd_dist/distill/reference.py; this header
// holds (1) the vectorised dense kernels over a run of logits (declared here, defined once in kd_vec.cpp,
// compiled for several instruction sets), (2) the per-row "sparse" part of the loss (cross-entropy at the
// target, per-teacher KL and ranking terms at the teacher ids), written once as templates over how a logit
// s_j is fetched, so the logits-given op and the fused linear op share the same semantics, and (3) the tiled
// passes over logits = user_emb @ item_emb.T (+ bias) that the fused-linear op and the catalog-parallel
// local op share (online LSE statistics forward, softmax-weighted gradient backward).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace prmkd {

// ------------------------------------------------------------------------------------------ dense kernels
// Run length processed at once by the logits-given op: 8 KiB of float32 stays in L1 between the max pass and
// the exp pass, so a row is effectively read from memory once.
constexpr int64_t kChunk = 2048;

// max_j x[j]
float vec_max(const float* x, int64_t n);
// Adds sum_j exp(x[j] - shift) to *s1 and sum_j exp((x[j] - shift) * inv_tau) to *s_tau (the latter is
// not computed, only copied, when same_tau: tau = 1 needs one exp per element, not two).
void vec_sumexp2(const float* x, int64_t n, float shift, float inv_tau, bool same_tau, double* s1, double* s_tau);
// out[j] = a * exp(x[j] - lse1) + c * exp(x[j] * inv_tau - lse_tau): the dense part of d loss / d s.
// Terms whose coefficient is 0 are skipped; same_tau fuses them into one exp.
void vec_softmax_mix(const float* x, int64_t n, float a, float lse1, float c, float inv_tau, float lse_tau,
                     bool same_tau, float* out);
// Teacher softmax over one list of K slots (ids < 0 = empty): p[k] = softmax(scores * inv_tau)_k over the valid
// slots, 0 on the empty ones, and *lse = its log-normaliser (log p_k = scores[k] * inv_tau - *lse). Returns
// false, writing nothing, when no slot is valid. float32 with the vectorised exp (one call per row and teacher
// replaces 2-3 scalar double exps per slot in the row formula below).
bool vec_teacher_softmax(const int64_t* ids, const float* scores, int64_t K, float inv_tau, float* p, double* lse);
// sum_k [ids[k] >= 0] rank[k] * log sigmoid(s[k]) (the ranking term of one teacher list before its -1 / total)
double vec_rank_logsig(const int64_t* ids, const float* rank, const float* s, int64_t K);
// out[k] = 1 - sigmoid(s[k]) (= sigmoid(-s[k])), the ranking term's gradient factor
void vec_sigmoid_neg(const float* s, int64_t K, float* out);
// dst[j] += src[j]
void vec_add(float* dst, const float* src, int64_t n);
// bfloat16 <-> float32 (round to nearest even), on raw bit patterns.
void bf16_to_float(const uint16_t* src, float* dst, int64_t n);
void float_to_bf16(const float* src, uint16_t* dst, int64_t n);

// ------------------------------------------------------------------------------------- loss parameters
struct LossParams {
  double tau;
  double lambda_ce, lambda_kd, lambda_rank;
  bool same_tau() const { return tau == 1.0; }
};

inline LossParams make_params(double temperature, double lambda_ce, double lambda_kd, double lambda_rank) {
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "prmkd: temperature must be > 0 and finite, got ",
              temperature);
  return LossParams{temperature, lambda_ce, lambda_kd, lambda_rank};
}

// Online log-sum-exp state of one row at temperatures 1 and tau: lse1 = m + log(s1), lse_tau = m/tau + log(s_tau).
struct LseState {
  float m = -std::numeric_limits<float>::infinity();
  double s1 = 0.0, s_tau = 0.0;

  // Folds in a run of logits (n > 0): rescale the sums once per run when the max grows, then add the run.
  void update(const float* x, int64_t n, float inv_tau, bool same_tau) {
    const float run_max = vec_max(x, n);
    if (run_max > m) {
      rescale(run_max, inv_tau);
      m = run_max;
    }
    vec_sumexp2(x, n, m, inv_tau, same_tau, &s1, &s_tau);
  }

  // Merges another state (another thread's share of the columns of the same row).
  void merge(const LseState& o, float inv_tau) {
    if (o.s1 == 0.0) return;
    if (s1 == 0.0) { *this = o; return; }
    LseState other = o;
    const float mm = std::max(m, o.m);
    rescale(mm, inv_tau);
    other.rescale(mm, inv_tau);
    m = mm;
    s1 += other.s1;
    s_tau += other.s_tau;
  }

  double lse1() const { return double(m) + std::log(s1); }
  double lse_tau(float inv_tau) const { return double(m) * inv_tau + std::log(s_tau); }

 private:
  // Re-expresses the sums relative to a new max new_m >= m.
  void rescale(float new_m, float inv_tau) {
    if (s1 == 0.0) return;
    const double d = double(m) - double(new_m);
    s1 *= std::exp(d);
    s_tau *= std::exp(d * inv_tau);
  }
};

// ------------------------------------------------------------------------------------ the sparse part
// One row's teacher inputs: ids/scores/rank weights [T, K], weights [T]; rank == nullptr means no ranking term.
struct TeacherRow {
  const int64_t* ids;
  const float* scores;
  const float* weights;
  const float* rank;
  int64_t T, K;
};

inline TeacherRow teacher_row(const int64_t* ids, const float* scores, const float* weights, const float* rank,
                              int64_t T, int64_t K, int64_t b) {
  return TeacherRow{ids + b * T * K, scores + b * T * K, weights + b * T, rank ? rank + b * T * K : nullptr, T, K};
}

// Teacher t's softmax over its valid slots of scores / tau into p[0..K) (0 on empty slots; p is a per-thread
// scratch row, see slot_scratch): returns false for an empty teacher, else sets *lse so that
// log p_k = scores[k] / tau - *lse.
inline bool teacher_softmax(const TeacherRow& r, int64_t t, double tau, float* p, double* lse) {
  return vec_teacher_softmax(r.ids + t * r.K, r.scores + t * r.K, r.K, float(1.0 / tau), p, lse);
}

// 3 x K floats of per-thread scratch for the row formula (it runs inside at::parallel_for): the teacher's
// probabilities, its slots' logits, and the ranking factors
inline float* slot_scratch(int64_t K) {
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < 3 * K) buf.resize(size_t(3 * K));
  return buf.data();
}

// sum over teacher t's valid slots of its rank weights (the normaliser of rho_hat).
inline double rank_total(const TeacherRow& r, int64_t t) {
  const int64_t* ids = r.ids + t * r.K;
  const float* rw = r.rank + t * r.K;
  double total = 0.0;
  for (int64_t k = 0; k < r.K; ++k)
    if (ids[k] >= 0) total += rw[k];
  return total;
}

// l_b given both LSEs; logit(j, slot) returns s_j as float, where slot is -1 for the target and t * K + k for
// teacher slot (t, k) (an accessor over the full logits reads j; one over gathered logits reads the slot).
template <class Logit>
inline double row_loss(const TeacherRow& r, int64_t y, double lse1, double lse_tau, const LossParams& P,
                       Logit&& logit) {
  double loss = 0.0;
  if (y >= 0 && P.lambda_ce != 0.0) loss += P.lambda_ce * (lse1 - double(logit(y, int64_t(-1))));
  const bool rank_on = r.rank != nullptr && P.lambda_rank != 0.0;
  if (P.lambda_kd == 0.0 && !rank_on) return loss;
  double kd = 0.0, rank = 0.0;
  float* p = slot_scratch(r.K);
  float* sk = p + r.K;  // the list's logits, 0 on empty slots
  for (int64_t t = 0; t < r.T; ++t) {
    const double w = r.weights[t];
    double lse_t;
    if (!teacher_softmax(r, t, P.tau, p, &lse_t)) continue;  // KL_bt = R_bt = 0 for an empty teacher
    const int64_t* ids = r.ids + t * r.K;
    const float* sc = r.scores + t * r.K;
    const double rtot = rank_on ? rank_total(r, t) : 0.0;
    double kl = 0.0;
    for (int64_t k = 0; k < r.K; ++k) {
      sk[k] = ids[k] >= 0 ? float(logit(ids[k], t * r.K + k)) : 0.0f;
      if (ids[k] < 0) continue;
      const double log_p = double(sc[k]) / P.tau - lse_t;
      kl += double(p[k]) * (log_p - (double(sk[k]) / P.tau - lse_tau));
    }
    const double rk = rtot > 0.0 ? -vec_rank_logsig(ids, r.rank + t * r.K, sk, r.K) / rtot : 0.0;
    kd += w * kl;
    rank += w * rk;
  }
  return loss + P.lambda_kd * P.tau * P.tau * kd + P.lambda_rank * rank;
}

// Dense coefficients of d l_b / d s_j = a * softmax_1(s)_j + c * softmax_tau(s)_j + sparse corrections:
// a = g lambda_ce [y >= 0], c = g lambda_kd tau sum_t w_t [teacher t non-empty] (sum_k p_tk = 1 then).
inline void row_dense_coefs(const TeacherRow& r, int64_t y, double g, const LossParams& P, double* a, double* c) {
  *a = (y >= 0) ? g * P.lambda_ce : 0.0;
  double w_sum = 0.0;
  if (P.lambda_kd != 0.0) {
    for (int64_t t = 0; t < r.T; ++t) {
      const int64_t* ids = r.ids + t * r.K;
      for (int64_t k = 0; k < r.K; ++k)
        if (ids[k] >= 0) { w_sum += r.weights[t]; break; }
    }
  }
  *c = g * P.lambda_kd * P.tau * w_sum;
}

// The sparse corrections of d l_b / d s: emit(j, slot, delta) for the target (slot -1) and every valid teacher
// slot (slot t * K + k; an id may be emitted several times: per id the deltas add). logit as in row_loss.
//   target:        -g lambda_ce
//   teacher slot:  -g lambda_kd tau w_t p_tk  -  g lambda_rank w_t rho_hat_tk (1 - sigmoid(s_j))
template <class Logit, class Emit>
inline void row_sparse_grad(const TeacherRow& r, int64_t y, double g, const LossParams& P, Logit&& logit,
                            Emit&& emit) {
  if (y >= 0 && P.lambda_ce != 0.0) emit(y, int64_t(-1), -g * P.lambda_ce);
  const bool rank_on = r.rank != nullptr && P.lambda_rank != 0.0;
  if (P.lambda_kd == 0.0 && !rank_on) return;
  float* p = slot_scratch(r.K);
  float* sk = p + r.K;       // the list's logits (ranking term only)
  float* neg = p + 2 * r.K;  // 1 - sigmoid(s) at them
  for (int64_t t = 0; t < r.T; ++t) {
    const double w = r.weights[t];
    double lse_t;
    if (!teacher_softmax(r, t, P.tau, p, &lse_t)) continue;
    const int64_t* ids = r.ids + t * r.K;
    const double rtot = rank_on ? rank_total(r, t) : 0.0;
    if (rtot > 0.0) {
      for (int64_t k = 0; k < r.K; ++k) sk[k] = ids[k] >= 0 ? float(logit(ids[k], t * r.K + k)) : 0.0f;
      vec_sigmoid_neg(sk, r.K, neg);
    }
    for (int64_t k = 0; k < r.K; ++k) {
      if (ids[k] < 0) continue;
      double d = -g * P.lambda_kd * P.tau * w * double(p[k]);
      if (rtot > 0.0) d -= g * P.lambda_rank * w * (double(r.rank[t * r.K + k]) / rtot) * double(neg[k]);
      emit(ids[k], t * r.K + k, d);
    }
  }
}

// --------------------------------------------------------------------------- tiled passes over u @ E.T
// The catalog is cut into item tiles of kTileItems rows of item_emb; the tiles are split into one contiguous
// share per thread (parallel over tiles, not rows: each thread then streams its own part of item_emb once and
// the item gradient of a tile has a single writer). Inside a share, a tile is multiplied with a block of
// kTileRows users at a time by BLAS (at::mm, single-threaded inside the parallel region), so the logits block
// [kTileRows, kTileItems] (256 KiB) stays in cache while it is consumed.
constexpr int64_t kTileItems = 512;
constexpr int64_t kTileRows = 128;

struct LinearInputs {
  at::Tensor user, item, bias;  // float32 contiguous; bias undefined when absent
  int64_t B, C, d;
};

// allow_empty: a catalog shard may hold no rows (C = 0); the full-catalog op needs at least one item.
inline LinearInputs prepare_linear(const at::Tensor& user_emb, const at::Tensor& item_emb,
                                   const c10::optional<at::Tensor>& bias, bool allow_empty = false) {
  TORCH_CHECK(user_emb.dim() == 2 && item_emb.dim() == 2 && user_emb.size(1) == item_emb.size(1),
              "prmkd: user_emb [B, d] and item_emb [C, d] must share d, got ", user_emb.sizes(), " and ",
              item_emb.sizes());
  TORCH_CHECK(user_emb.scalar_type() == item_emb.scalar_type() &&
                  (user_emb.scalar_type() == at::kFloat || user_emb.scalar_type() == at::kBFloat16),
              "prmkd: user_emb and item_emb must both be float32 or both bfloat16, got ", user_emb.scalar_type(),
              " and ", item_emb.scalar_type());
  TORCH_CHECK(user_emb.device().is_cpu() && item_emb.device().is_cpu(), "prmkd: embeddings must be CPU tensors");
  TORCH_CHECK(allow_empty || item_emb.size(0) > 0, "prmkd: item_emb needs at least one item");
  LinearInputs in;
  // detached: these are kernel inputs, not part of an autograd graph (out= BLAS calls refuse grad-requiring args)
  in.user = user_emb.detach().to(at::kFloat).contiguous();
  in.item = item_emb.detach().to(at::kFloat).contiguous();
  in.B = user_emb.size(0);
  in.C = item_emb.size(0);
  in.d = user_emb.size(1);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == in.C && bias->device().is_cpu(),
                "prmkd: item_bias must be a CPU [C=", in.C, "] tensor, got ", bias->sizes());
    in.bias = bias->detach().to(at::kFloat).contiguous();
  }
  return in;
}

// s_bj = <user_b, item_j> + bias_j, for the sparse terms.
struct DotLogit {
  const float* u;
  const float* it;
  const float* bias;
  int64_t d;
  float operator()(int64_t b, int64_t j) const {
    const float* x = u + b * d;
    const float* y = it + j * d;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < d; ++k) s += x[k] * y[k];
    return bias ? s + bias[j] : s;
  }
};

inline DotLogit dot_logit(const LinearInputs& in) {
  return DotLogit{in.user.data_ptr<float>(), in.item.data_ptr<float>(),
                  in.bias.defined() ? in.bias.data_ptr<float>() : nullptr, in.d};
}

inline int64_t share_count(int64_t C) {
  const int64_t n_tiles = (C + kTileItems - 1) / kTileItems;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
}

// Calls body(share, tile_begin, tile_end) for each thread's contiguous share of the item tiles, in parallel.
template <class Body>
void for_each_share(int64_t C, int64_t n_shares, Body&& body) {
  const int64_t n_tiles = (C + kTileItems - 1) / kTileItems;
  at::parallel_for(0, n_shares, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) body(s, s * n_tiles / n_shares, (s + 1) * n_tiles / n_shares);
  });
}

// logits block = user[r0:r0+m] @ item[c0:c0+n].T (+ bias[c0:c0+n]) into buf (m x n, row-major).
inline at::Tensor logits_block(const LinearInputs& in, int64_t r0, int64_t m, int64_t c0, int64_t n, float* buf) {
  at::Tensor out = at::from_blob(buf, {m, n}, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor u = in.user.narrow(0, r0, m), it = in.item.narrow(0, c0, n).t();
  if (in.bias.defined())
    at::addmm_out(out, in.bias.narrow(0, c0, n), u, it);
  else
    at::mm_out(out, u, it);
  return out;
}

// Per-call workspaces of several MiB (TileBuckets' entries: 8 bytes per selected pair, ~3 MiB a call at the
// scaling benchmark's shape) come from a small pool of grow-only blocks instead of malloc: glibc hands
// blocks this size back to the kernel between steps, so a fresh one often cost a page fault per 4 KiB (these
// entries were ~60 % of the distillation step's page faults at 2 ranks, `perf record -e page-faults`, 2026-11-27).
class ScratchBlock {
 public:
  ScratchBlock() = default;
  explicit ScratchBlock(size_t bytes) {
    std::lock_guard<std::mutex> lock(pool_mutex());
    auto& pool = free_blocks();
    // the smallest free block that fits, else a new one (a full pool drops its smallest block on release, so it
    // settles on the largest sizes in use)
    int64_t pick = -1;
    for (size_t i = 0; i < pool.size(); ++i)
      if (pool[i].second >= bytes && (pick < 0 || pool[i].second < pool[size_t(pick)].second)) pick = int64_t(i);
    if (pick >= 0) {
      buf_ = std::move(pool[size_t(pick)].first);
      cap_ = pool[size_t(pick)].second;
      pool.erase(pool.begin() + pick);
    }
    if (cap_ < bytes) {
      // with headroom (the sizes vary a little from step to step: a block just too small would be replaced each
      // time), in 64 KiB units; uninitialised, the users write before they read
      cap_ = (bytes + bytes / 4 + 65535) / 65536 * 65536;
      buf_.reset(new char[cap_]);
    }
  }
  ScratchBlock(ScratchBlock&& o) noexcept : buf_(std::move(o.buf_)), cap_(o.cap_) { o.cap_ = 0; }
  ScratchBlock& operator=(ScratchBlock&& o) noexcept {
    if (this != &o) {
      release();
      buf_ = std::move(o.buf_);
      cap_ = o.cap_;
      o.cap_ = 0;
    }
    return *this;
  }
  ScratchBlock(const ScratchBlock&) = delete;
  ScratchBlock& operator=(const ScratchBlock&) = delete;
  ~ScratchBlock() { release(); }
  template <class T>
  T* as() const { return reinterpret_cast<T*>(buf_.get()); }

 private:
  static constexpr size_t kKeep = 6;                    // blocks the pool keeps (a step holds at most four at once)
  static constexpr size_t kKeepBytes = size_t(1) << 30;  // and at most 1 GiB of them (larger blocks go back to malloc)
  // One pool for the process, not per thread: a returned tensor can die on another thread (gloo's worker frees
  // the buffer it sent), which would move its block to a pool the next call never sees.
  static std::mutex& pool_mutex() {
    static std::mutex m;
#ifdef __linux__
    // held across fork() (DataLoader workers), so that a child never inherits it locked by a thread it lacks
    static const bool at_fork = [] {
      pthread_atfork([] { m.lock(); }, [] { m.unlock(); }, [] { m.unlock(); });
      return true;
    }();
    (void)at_fork;
#endif
    return m;
  }
  static std::vector<std::pair<std::unique_ptr<char[]>, size_t>>& free_blocks() {
    static auto* pool = new std::vector<std::pair<std::unique_ptr<char[]>, size_t>>();  // never destroyed: tensors
    return *pool;                                                                       // may die at exit
  }
  void release() {
    if (!buf_) return;
    std::lock_guard<std::mutex> lock(pool_mutex());
    auto& pool = free_blocks();
    if (pool.size() >= kKeep) {
      auto smallest = std::min_element(pool.begin(), pool.end(), [](const auto& a, const auto& b) {
        return a.second < b.second;
      });
      if (smallest->second < cap_) pool.erase(smallest);
    }
    size_t kept = 0;
    for (const auto& blk : pool) kept += blk.second;
    if (pool.size() < kKeep && kept + cap_ <= kKeepBytes) pool.emplace_back(std::move(buf_), cap_);
    buf_.reset();
    cap_ = 0;
  }
  std::unique_ptr<char[]> buf_;
  size_t cap_ = 0;
};

// A fresh CPU tensor whose memory comes from the scratch pool and goes back to it when the tensor dies (on
// whichever thread): for the per-step outputs of several MiB that the ops return each call (route_by_owner's,
// the catalog-local op's picked logits).
inline at::Tensor pooled_empty(int64_t numel, at::ScalarType dtype) {
  const size_t bytes = size_t(std::max<int64_t>(numel, 1)) * c10::elementSize(dtype);
  auto* holder = new ScratchBlock(bytes);
  return at::from_blob(holder->as<void>(), {numel}, [holder](void*) { delete holder; },
                       at::TensorOptions().dtype(dtype).device(at::kCPU));
}

// Sparse (row, item) entries of a [B, C] logits matrix (the target and teacher ids of each row), bucketed by
// logits block: (item tile, block of kTileRows rows), the unit the tile passes below form at once. While a
// block is in cache, the forward picks its selected logits out of it and the backward adds their gradients
// into it before the GEMMs (no per-entry d-wide dot products or axpys over scattered rows). Buckets are
// read-only once built, so the threads that own different tiles visit them concurrently.
struct TileBuckets {
  // One entry per selected pair, 8 bytes: building and reading the entries is the per-entry cost of the ops
  // (about a million per step at the scaling benchmark's shape), so they are small and left uninitialised
  // until written.
  struct Entry {
    int32_t flat;  // index of the entry in the caller's ids (b * slots + s when dense): where its value lives
    uint16_t row;  // b - block start, < kTileRows
    uint16_t col;  // item - tile start, < kTileItems
  };
  static_assert(kTileRows <= 65536 && kTileItems <= 65536, "TileBuckets packs block offsets in 16 bits");
  int64_t n_row_blocks = 0;
  std::vector<int64_t> start;  // [n_tiles * n_row_blocks + 1]: block (t, rb) is entries start[i] .. start[i + 1]
  ScratchBlock storage;        // the entries (uninitialised until written)
  Entry* entries = nullptr;

  TileBuckets() = default;
  // The entries whose id - offset lies in [0, C) (items offset .. offset + C - 1 are this table's rows 0 .. C-1);
  // every other id (-1 = empty, another shard's item) is skipped. The callers validate ids with their own
  // messages. Dense form: ids [B, slots], row b's ids at b * slots ...
  TileBuckets(const int64_t* ids, int64_t B, int64_t slots, int64_t C, int64_t offset = 0) {
    build(ids, B, C, offset, [slots](int64_t b) { return b * slots; });
  }
  // ... CSR form: ids [E], row b's ids at ptr[b] .. ptr[b + 1] - 1 (ptr [B + 1], non-decreasing, ptr[0] = 0: the
  // catalog-parallel loss's routed ids, each rank receiving only the entries it owns, int32 as they arrive or
  // int64). `flat` is then the index e.
  template <class Id>
  TileBuckets(const Id* ids, const int64_t* ptr, int64_t B, int64_t C, int64_t offset = 0) {
    build(ids, B, C, offset, [ptr](int64_t b) { return ptr[b]; });
  }
  bool empty() const { return start.empty() || start.back() == 0; }
  // f(flat, r, col) for the entries of the logits block of tile `tile` and rows r0 .. r0 + kTileRows - 1
  // (r0 a multiple of kTileRows): the entry's value is at (r0 + r, tile start + col)
  template <class F>
  void visit_block(int64_t tile, int64_t r0, F&& f) const {
    if (start.empty()) return;
    const int64_t i = tile * n_row_blocks + r0 / kTileRows;
    for (int64_t k = start[i], end = start[i + 1]; k < end; ++k) {
      const Entry e = entries[k];
      f(int64_t(e.flat), int64_t(e.row), int64_t(e.col));
    }
  }

 private:
  // A serial counting sort by block of the ids of rows 0 .. B-1, row b's at row_begin(b) .. row_begin(b + 1) - 1.
  // (Splitting it over row chunks per thread was tried on 2026-11-27 with 16-byte entries bucketed by tile
  // only: no change beyond run-to-run noise in `benchmarks/row_ops.py --threads 2 --shard-rows 9742`.)
  template <class Id, class RowBegin>
  void build(const Id* ids, int64_t B, int64_t C, int64_t offset, RowBegin&& row_begin) {
    const int64_t first = row_begin(0), last = row_begin(B);
    TORCH_CHECK(last < (int64_t(1) << 31), "prmkd: ", last, " selected ids exceed the 2^31 a TileBuckets indexes");
    const int64_t n_tiles = (C + kTileItems - 1) / kTileItems;
    n_row_blocks = (B + kTileRows - 1) / kTileRows;
    const uint64_t span = uint64_t(C);
    start.assign(n_tiles * n_row_blocks + 1, 0);
    // counts, shifted by one; unsigned compare: ids below the offset (and -1) wrap to huge values, one test for
    // both ends; tile and block numbers by shifts (both sizes are powers of two)
    for (int64_t b = 0, i = first; b < B; ++b) {
      int64_t* row_counts = start.data() + 1 + b / kTileRows;
      for (const int64_t end = row_begin(b + 1); i < end; ++i) {
        const uint64_t l = uint64_t(int64_t(ids[i]) - offset);
        if (l < span) ++row_counts[int64_t(l / kTileItems) * n_row_blocks];
      }
    }
    for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
    storage = ScratchBlock(size_t(start.back()) * sizeof(Entry));
    entries = storage.as<Entry>();
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t b = 0, i = first; b < B; ++b) {  // rows ascending: each block's entries come out row-sorted
      int64_t* block_next = next.data() + b / kTileRows;
      const uint16_t r = uint16_t(b % kTileRows);
      for (const int64_t end = row_begin(b + 1); i < end; ++i) {
        const uint64_t l = uint64_t(int64_t(ids[i]) - offset);
        if (l >= span) continue;
        const int64_t t = int64_t(l / kTileItems);
        entries[block_next[t * n_row_blocks]++] = Entry{int32_t(i), r, uint16_t(l - uint64_t(t) * kTileItems)};
      }
    }
  }
};

// Forward pass: each row's online (max, sum-exp at 1 and tau) over all in.C items, merged across threads.
// A row of an empty catalog keeps the initial state (m = -inf, sums 0). `on_block(r0, m, c0, n, logits)` sees
// every [m, n] block of logits (rows r0.., items c0..; r0 a multiple of kTileRows, c0 of kTileItems) once,
// before it is reduced, on the thread that owns its tile (where the catalog-local op picks selected logits).
template <typename OnBlock>
inline std::vector<LseState> linear_row_states(const LinearInputs& in, float inv_tau, bool same_tau,
                                               OnBlock&& on_block) {
  const int64_t B = in.B, C = in.C;
  const int64_t n_shares = share_count(C);
  std::vector<LseState> states(n_shares * B);
  for_each_share(C, n_shares, [&](int64_t share, int64_t t0, int64_t t1) {
    std::vector<float> buf(kTileRows * kTileItems);
    LseState* st = states.data() + share * B;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t c0 = tile * kTileItems, n = std::min(kTileItems, C - c0);
      for (int64_t r0 = 0; r0 < B; r0 += kTileRows) {
        const int64_t m = std::min(kTileRows, B - r0);
        logits_block(in, r0, m, c0, n, buf.data());
        on_block(r0, m, c0, n, static_cast<const float*>(buf.data()));
        for (int64_t r = 0; r < m; ++r) st[r0 + r].update(buf.data() + r * n, n, inv_tau, same_tau);
      }
    }
  });
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t s = 1; s < n_shares; ++s) states[b].merge(states[s * B + b], inv_tau);
  });
  states.resize(B);
  return states;
}

inline std::vector<LseState> linear_row_states(const LinearInputs& in, float inv_tau, bool same_tau) {
  return linear_row_states(in, inv_tau, same_tau, [](int64_t, int64_t, int64_t, int64_t, const float*) {});
}

// Backward, dense part: with dS_bj = a_b exp(s_bj - lse1_b) + c_b exp(s_bj / tau - lse_tau_b) (recomputed tile
// by tile, never stored), returns dS @ item (float32 [B, d]) and writes dS^T @ user into d_item [C, d] and the
// column sums of dS into d_bias [C] (both float32, zero-initialised by the caller).
// The sparse gradient entries (`sparse`, deltas sp_delta[flat]: d loss / d s_bj at target and teacher ids) are
// added into the logits-gradient block before its GEMMs, so they reach d_user, d_item and d_bias with the dense
// part.
inline at::Tensor linear_dense_grad(const LinearInputs& in, const float* coef_a, const float* coef_c,
                                    const float* lse1, const float* lse_tau, float inv_tau, bool same_tau,
                                    at::Tensor& d_item, at::Tensor& d_bias, const TileBuckets& sparse,
                                    const float* sp_delta) {
  const int64_t B = in.B, C = in.C, d = in.d;
  const int64_t n_shares = share_count(C);
  at::Tensor d_user_shares = at::zeros({n_shares, B, d}, at::TensorOptions().dtype(at::kFloat));
  float* d_bias_p = d_bias.data_ptr<float>();
  for_each_share(C, n_shares, [&](int64_t share, int64_t t0, int64_t t1) {
    std::vector<float> buf(kTileRows * kTileItems);
    at::Tensor d_user = d_user_shares[share];
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t c0 = tile * kTileItems, n = std::min(kTileItems, C - c0);
      at::Tensor d_item_tile = d_item.narrow(0, c0, n);
      for (int64_t r0 = 0; r0 < B; r0 += kTileRows) {
        const int64_t m = std::min(kTileRows, B - r0);
        at::Tensor ds = logits_block(in, r0, m, c0, n, buf.data());
        for (int64_t r = 0; r < m; ++r) {
          const int64_t b = r0 + r;
          float* row = buf.data() + r * n;  // in place: logits -> d loss / d logits
          vec_softmax_mix(row, n, coef_a[b], lse1[b], coef_c[b], inv_tau, lse_tau[b], same_tau, row);
        }
        sparse.visit_block(tile, r0, [&](int64_t flat, int64_t r, int64_t col) { buf[r * n + col] += sp_delta[flat]; });
        for (int64_t r = 0; r < m; ++r) vec_add(d_bias_p + c0, buf.data() + r * n, n);
        d_user.narrow(0, r0, m).addmm_(ds, in.item.narrow(0, c0, n));
        d_item_tile.addmm_(ds.t(), in.user.narrow(0, r0, m));
      }
    }
  });
  return n_shares == 1 ? d_user_shares[0] : d_user_shares.sum(0);
}

// ------------------------------------------------------------------------------------- large outputs
// A fresh [B, C] gradient (hundreds of MiB) costs more in first-touch page faults than in arithmetic: with
// 4 KiB pages, faulting 400 MiB in took ~0.65 s on the 2-core dev VM, about 8x the time to write it.
// Outputs this large are therefore 2 MiB-aligned and advised for transparent huge pages (honoured under
// the common THP mode "madvise"; a plain allocation otherwise). Smaller outputs use torch's allocator.
inline at::Tensor empty_large(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
#ifdef __linux__
  constexpr size_t kHugePage = size_t(2) << 20;
  if (nbytes >= 16 * kHugePage) {
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) == 0) {
      madvise(p, bytes, MADV_HUGEPAGE);  // advice only: a refusal leaves ordinary pages, still correct
      return at::from_blob(p, sizes, [](void* q) { std::free(q); }, opts);
    }
  }
#endif
  return at::empty(sizes, opts);
}

// ---------------------------------------------------------------------------------------- input checks
// The dispatcher validates values; these cheap structural checks keep a direct caller from reading out of bounds.
inline void check_teacher_inputs(const at::Tensor& target, const at::Tensor& ids, const at::Tensor& scores,
                                 const at::Tensor& weights, const c10::optional<at::Tensor>& rank, int64_t B) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == B && target.scalar_type() == at::kLong && target.is_contiguous(),
              "prmkd: target must be a contiguous int64 [B=", B, "] tensor, got ", target.sizes(), " ",
              target.scalar_type());
  TORCH_CHECK(ids.dim() == 3 && ids.size(0) == B && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "prmkd: teacher_ids must be a contiguous int64 [B, T, K] tensor with B=", B, ", got ", ids.sizes());
  TORCH_CHECK(scores.sizes() == ids.sizes() && scores.scalar_type() == at::kFloat && scores.is_contiguous(),
              "prmkd: teacher_scores must be a contiguous float32 tensor of teacher_ids' shape ", ids.sizes(), ", got ",
              scores.sizes(), " ", scores.scalar_type());
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == B && weights.size(1) == ids.size(1) &&
                  weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "prmkd: teacher_weights must be a contiguous float32 [B, T] tensor, got ", weights.sizes());
  if (rank.has_value() && rank->defined()) {
    TORCH_CHECK(rank->sizes() == ids.sizes() && rank->scalar_type() == at::kFloat && rank->is_contiguous(),
                "prmkd: rank_weights must be a contiguous float32 tensor of teacher_ids' shape ", ids.sizes(),
                ", got ", rank->sizes());
  }
}

inline const float* rank_ptr(const c10::optional<at::Tensor>& rank) {
  return (rank.has_value() && rank->defined() && rank->numel() > 0) ? rank->data_ptr<float>() : nullptr;
}

}  // namespace prmkd
