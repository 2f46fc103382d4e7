// prmkd::kd_rows_fwd / prmkd::kd_rows_bwd: the row loss l_b from the per-row statistics it depends on (LSE_1,
// LSE_tau and the logits at the target and the T*K teacher ids), as reference.kd_rows_from_stats computes it
// with a dozen [B, T, K] tensor ops. The catalog-parallel loss gets these statistics from its all-reduces
// and evaluates the rows here: one pass per row over its slots, with the same row formula (kd_common.h) as
// the fused kd_loss / kd_loss_linear ops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kd_common.h"

namespace prmkd {
namespace {

void check_stats(const at::Tensor& sel, const at::Tensor& teacher_ids, int64_t B) {
  const int64_t slots = 1 + teacher_ids.size(1) * teacher_ids.size(2);
  TORCH_CHECK(sel.dim() == 2 && sel.size(0) == B && sel.size(1) == slots && sel.scalar_type() == at::kFloat &&
                  sel.is_contiguous() && sel.device().is_cpu(),
              "prmkd: sel must be a contiguous float32 CPU [B=", B, ", 1 + T*K=", slots, "] tensor, got ", sel.sizes(),
              " ", sel.scalar_type());
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.device().is_cpu(),
              "prmkd: ", name, " must be a contiguous float32 CPU [B=", B, "] tensor, got ", t.sizes(), " ",
              t.scalar_type());
}

at::Tensor kd_rows_fwd(const at::Tensor& lse1, const at::Tensor& lse_tau, const at::Tensor& sel,
                       const at::Tensor& target, const at::Tensor& teacher_ids, const at::Tensor& teacher_scores,
                       const at::Tensor& teacher_weights, const c10::optional<at::Tensor>& rank_weights,
                       double temperature, double lambda_ce, double lambda_kd, double lambda_rank) {
  const int64_t B = lse1.size(0);
  check_row_vector(lse1, "lse1", B);
  check_row_vector(lse_tau, "lse_tau", B);
  check_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights, rank_weights, B);
  check_stats(sel, teacher_ids, B);
  const LossParams P = make_params(temperature, lambda_ce, lambda_kd, lambda_rank);
  const int64_t T = teacher_ids.size(1), K = teacher_ids.size(2), slots = 1 + T * K;
  at::Tensor loss = at::empty({B}, lse1.options());
  float* loss_p = loss.data_ptr<float>();
  const float* l1 = lse1.data_ptr<float>();
  const float* lt = lse_tau.data_ptr<float>();
  const float* s = sel.data_ptr<float>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t* ids = teacher_ids.data_ptr<int64_t>();
  const float* sc = teacher_scores.data_ptr<float>();
  const float* tw = teacher_weights.data_ptr<float>();
  const float* rw = rank_ptr(rank_weights);
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = s + b * slots;  // [target, teacher slots...]
      loss_p[b] = float(row_loss(teacher_row(ids, sc, tw, rw, T, K, b), tgt[b], l1[b], lt[b], P,
                                 [&](int64_t, int64_t slot) { return row[1 + slot]; }));
    }
  });
  return loss;
}

// -> (d l / d lse1 [B], d l / d lse_tau [B], d l / d sel [B, 1 + T*K]), each row scaled by grad_rows
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_rows_bwd(
    const at::Tensor& grad_rows, const at::Tensor& sel, const at::Tensor& target, const at::Tensor& teacher_ids,
    const at::Tensor& teacher_scores, const at::Tensor& teacher_weights, const c10::optional<at::Tensor>& rank_weights,
    double temperature, double lambda_ce, double lambda_kd, double lambda_rank) {
  const int64_t B = grad_rows.size(0);
  check_row_vector(grad_rows, "grad_rows", B);
  check_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights, rank_weights, B);
  check_stats(sel, teacher_ids, B);
  const LossParams P = make_params(temperature, lambda_ce, lambda_kd, lambda_rank);
  const int64_t T = teacher_ids.size(1), K = teacher_ids.size(2), slots = 1 + T * K;
  at::Tensor g_lse1 = at::empty({B}, grad_rows.options()), g_lse_tau = at::empty({B}, grad_rows.options());
  at::Tensor g_sel = at::zeros({B, slots}, grad_rows.options());
  float* g1 = g_lse1.data_ptr<float>();
  float* gt = g_lse_tau.data_ptr<float>();
  float* gs = g_sel.data_ptr<float>();
  const float* g = grad_rows.data_ptr<float>();
  const float* s = sel.data_ptr<float>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t* ids = teacher_ids.data_ptr<int64_t>();
  const float* sc = teacher_scores.data_ptr<float>();
  const float* tw = teacher_weights.data_ptr<float>();
  const float* rw = rank_ptr(rank_weights);
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const TeacherRow r = teacher_row(ids, sc, tw, rw, T, K, b);
      // d l / d s_j = a softmax_1(s)_j + c softmax_tau(s)_j + sparse: as d lse1 / d s_j = softmax_1(s)_j and
      // d lse_tau / d s_j = softmax_tau(s)_j / tau, the LSE gradients are a and c * tau
      double a, c;
      row_dense_coefs(r, tgt[b], g[b], P, &a, &c);
      g1[b] = float(a);
      gt[b] = float(c * P.tau);
      const float* row = s + b * slots;
      float* grow = gs + b * slots;
      row_sparse_grad(
          r, tgt[b], g[b], P, [&](int64_t, int64_t slot) { return row[1 + slot]; },
          [&](int64_t, int64_t slot, double d) { grow[1 + slot] += float(d); });
    }
  });
  return {g_lse1, g_lse_tau, g_sel};
}

}  // namespace

TORCH_LIBRARY_IMPL(prmkd, CPU, m) {
  m.impl("kd_rows_fwd", &kd_rows_fwd);
  m.impl("kd_rows_bwd", &kd_rows_bwd);
}

}  // namespace prmkd
