// Shared pieces of the C++ CPU distillation-loss ops (kd_loss.cpp, kd_loss_linear.cpp).
//
// The loss is defined in /work/shared/specs/kd-loss.md and by prmkd_dist/distill/reference.py; this header
// holds (1) the vectorised dense kernels over a run of logits (declared here, defined once in kd_vec.cpp,
// compiled for several instruction sets) and (2) the per-row "sparse" part of the loss (cross-entropy at the
// target, per-teacher KL and ranking terms at the teacher ids), written once as templates over how a logit
// s_j is fetched, so the logits-given op and the fused linear op share the same semantics.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>

#ifdef __linux__
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

// Teacher t's softmax over its valid slots of scores / tau: returns false for an empty teacher, else fills
// z_max and log_z so that log p_k = scores[k] / tau - z_max - log_z.
inline bool teacher_softmax(const TeacherRow& r, int64_t t, double tau, double* z_max, double* log_z) {
  const int64_t* ids = r.ids + t * r.K;
  const float* sc = r.scores + t * r.K;
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < r.K; ++k)
    if (ids[k] >= 0) m = std::max(m, double(sc[k]) / tau);
  if (m == -std::numeric_limits<double>::infinity()) return false;
  double z = 0.0;
  for (int64_t k = 0; k < r.K; ++k)
    if (ids[k] >= 0) z += std::exp(double(sc[k]) / tau - m);
  *z_max = m;
  *log_z = std::log(z);
  return true;
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

// log sigmoid(x) without overflow: min(x, 0) - log1p(exp(-|x|)).
inline double log_sigmoid(double x) { return std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x))); }
inline double sigmoid(double x) {
  return x >= 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x));
}

// l_b given both LSEs; logit(j) returns s_j as float.
template <class Logit>
inline double row_loss(const TeacherRow& r, int64_t y, double lse1, double lse_tau, const LossParams& P,
                       Logit&& logit) {
  double loss = 0.0;
  if (y >= 0 && P.lambda_ce != 0.0) loss += P.lambda_ce * (lse1 - double(logit(y)));
  const bool rank_on = r.rank != nullptr && P.lambda_rank != 0.0;
  if (P.lambda_kd == 0.0 && !rank_on) return loss;
  double kd = 0.0, rank = 0.0;
  for (int64_t t = 0; t < r.T; ++t) {
    const double w = r.weights[t];
    double z_max, log_z;
    if (!teacher_softmax(r, t, P.tau, &z_max, &log_z)) continue;  // KL_bt = R_bt = 0 for an empty teacher
    const int64_t* ids = r.ids + t * r.K;
    const float* sc = r.scores + t * r.K;
    const double rtot = rank_on ? rank_total(r, t) : 0.0;
    double kl = 0.0, rk = 0.0;
    for (int64_t k = 0; k < r.K; ++k) {
      if (ids[k] < 0) continue;
      const double s = logit(ids[k]);
      const double log_p = double(sc[k]) / P.tau - z_max - log_z;
      kl += std::exp(log_p) * (log_p - (s / P.tau - lse_tau));
      if (rtot > 0.0) rk -= (double(r.rank[t * r.K + k]) / rtot) * log_sigmoid(s);
    }
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

// The sparse corrections of d l_b / d s: emit(j, delta) for the target and every valid teacher slot
// (an id may be emitted several times: the deltas add).
//   target:        -g lambda_ce
//   teacher slot:  -g lambda_kd tau w_t p_tk  -  g lambda_rank w_t rho_hat_tk (1 - sigmoid(s_j))
template <class Logit, class Emit>
inline void row_sparse_grad(const TeacherRow& r, int64_t y, double g, const LossParams& P, Logit&& logit,
                            Emit&& emit) {
  if (y >= 0 && P.lambda_ce != 0.0) emit(y, -g * P.lambda_ce);
  const bool rank_on = r.rank != nullptr && P.lambda_rank != 0.0;
  if (P.lambda_kd == 0.0 && !rank_on) return;
  for (int64_t t = 0; t < r.T; ++t) {
    const double w = r.weights[t];
    double z_max, log_z;
    if (!teacher_softmax(r, t, P.tau, &z_max, &log_z)) continue;
    const int64_t* ids = r.ids + t * r.K;
    const float* sc = r.scores + t * r.K;
    const double rtot = rank_on ? rank_total(r, t) : 0.0;
    for (int64_t k = 0; k < r.K; ++k) {
      if (ids[k] < 0) continue;
      double d = -g * P.lambda_kd * P.tau * w * std::exp(double(sc[k]) / P.tau - z_max - log_z);
      if (rtot > 0.0) {
        const double rho = double(r.rank[t * r.K + k]) / rtot;
        d -= g * P.lambda_rank * w * rho * (1.0 - sigmoid(double(logit(ids[k]))));
      }
      emit(ids[k], d);
    }
  }
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
