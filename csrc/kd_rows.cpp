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

// The per-row inputs both directions read: checked once, then viewed row by row.
struct RowStats {
  int64_t B, T, K, slots;
  LossParams P;
  const float* sel;  // [B, 1 + T*K]: the logit at the target, then at each teacher slot
  const int64_t* target;
  const int64_t *ids;
  const float *scores, *weights, *rank;

  RowStats(int64_t batch, const at::Tensor& sel_t, const at::Tensor& target_t, const at::Tensor& teacher_ids,
           const at::Tensor& teacher_scores, const at::Tensor& teacher_weights,
           const c10::optional<at::Tensor>& rank_weights, double temperature, double lambda_ce, double lambda_kd,
           double lambda_rank)
      : B(batch) {
    check_teacher_inputs(target_t, teacher_ids, teacher_scores, teacher_weights, rank_weights, B);
    check_stats(sel_t, teacher_ids, B);
    P = make_params(temperature, lambda_ce, lambda_kd, lambda_rank);
    T = teacher_ids.size(1);
    K = teacher_ids.size(2);
    slots = 1 + T * K;
    sel = sel_t.data_ptr<float>();
    target = target_t.data_ptr<int64_t>();
    ids = teacher_ids.data_ptr<int64_t>();
    scores = teacher_scores.data_ptr<float>();
    weights = teacher_weights.data_ptr<float>();
    rank = rank_ptr(rank_weights);
  }
  TeacherRow teachers(int64_t b) const { return teacher_row(ids, scores, weights, rank, T, K, b); }
  // the row's logit at teacher slot ``slot`` (row formula accessor: (item id, slot) -> logit)
  auto logit(int64_t b) const {
    const float* row = sel + b * slots;
    return [row](int64_t, int64_t slot) { return row[1 + slot]; };
  }
};

at::Tensor kd_rows_fwd(const at::Tensor& lse1, const at::Tensor& lse_tau, const at::Tensor& sel,
                       const at::Tensor& target, const at::Tensor& teacher_ids, const at::Tensor& teacher_scores,
                       const at::Tensor& teacher_weights, const c10::optional<at::Tensor>& rank_weights,
                       double temperature, double lambda_ce, double lambda_kd, double lambda_rank) {
  const int64_t B = lse1.size(0);
  check_row_vector(lse1, "lse1", B);
  check_row_vector(lse_tau, "lse_tau", B);
  const RowStats R(B, sel, target, teacher_ids, teacher_scores, teacher_weights, rank_weights, temperature,
                   lambda_ce, lambda_kd, lambda_rank);
  at::Tensor loss = at::empty({B}, lse1.options());
  float* loss_p = loss.data_ptr<float>();
  const float* l1 = lse1.data_ptr<float>();
  const float* lt = lse_tau.data_ptr<float>();
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      loss_p[b] = float(row_loss(R.teachers(b), R.target[b], l1[b], lt[b], R.P, R.logit(b)));
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
  const RowStats R(B, sel, target, teacher_ids, teacher_scores, teacher_weights, rank_weights, temperature,
                   lambda_ce, lambda_kd, lambda_rank);
  at::Tensor g_lse1 = at::empty({B}, grad_rows.options()), g_lse_tau = at::empty({B}, grad_rows.options());
  at::Tensor g_sel = at::zeros({B, R.slots}, grad_rows.options());
  float* g1 = g_lse1.data_ptr<float>();
  float* gt = g_lse_tau.data_ptr<float>();
  float* gs = g_sel.data_ptr<float>();
  const float* g = grad_rows.data_ptr<float>();
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const TeacherRow r = R.teachers(b);
      // d l / d s_j = a softmax_1(s)_j + c softmax_tau(s)_j + sparse: as d lse1 / d s_j = softmax_1(s)_j and
      // d lse_tau / d s_j = softmax_tau(s)_j / tau, the LSE gradients are a and c * tau
      double a, c;
      row_dense_coefs(r, R.target[b], g[b], R.P, &a, &c);
      g1[b] = float(a);
      gt[b] = float(c * R.P.tau);
      float* grow = gs + b * R.slots;
      row_sparse_grad(r, R.target[b], g[b], R.P, R.logit(b),
                      [grow](int64_t, int64_t slot, double d) { grow[1 + slot] += float(d); });
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
