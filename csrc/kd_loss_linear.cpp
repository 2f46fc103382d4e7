// prmkd::kd_loss_linear_fwd / prmkd::kd_loss_linear_bwd: the distillation loss on
// logits = user_emb @ item_emb.T (+ item_bias) without ever holding the [B, C] logits.
//
// The tiled passes over the catalog live in kd_common.h (shared with the catalog-parallel local op):
//   forward:  per-thread online LSEs over item tiles (merged across threads at the end);
//   backward: each logits block is recomputed, turned in place into d loss / d logits, then
//             d user += dS @ item_tile (per-thread accumulator, summed at the end),
//             d item_tile += dS^T @ user_block, d bias_tile += column sums of dS.
// The target / teacher logits (the sparse part) are dot products. Memory: O(B d + C d + B T K + threads * B d).
// bfloat16 embeddings are upcast to float32 once (O(C d)); all arithmetic is float32.
#include <torch/library.h>

#include <vector>

#include "kd_common.h"

namespace prmkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_linear_fwd(
    const at::Tensor& user_emb, const at::Tensor& item_emb, const c10::optional<at::Tensor>& item_bias,
    const at::Tensor& target, const at::Tensor& teacher_ids, const at::Tensor& teacher_scores,
    const at::Tensor& teacher_weights, const c10::optional<at::Tensor>& rank_weights, double temperature,
    double lambda_ce, double lambda_kd, double lambda_rank) {
  const LinearInputs in = prepare_linear(user_emb, item_emb, item_bias);
  const int64_t B = in.B;
  check_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights, rank_weights, B);
  const LossParams P = make_params(temperature, lambda_ce, lambda_kd, lambda_rank);
  const bool same_tau = P.same_tau();
  const float inv_tau = float(1.0 / P.tau);
  const std::vector<LseState> states = linear_row_states(in, inv_tau, same_tau);

  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor loss = at::empty({B}, opts), lse1 = at::empty({B}, opts), lse_tau = at::empty({B}, opts);
  float* loss_p = loss.data_ptr<float>();
  float* lse1_p = lse1.data_ptr<float>();
  float* lset_p = lse_tau.data_ptr<float>();
  const int64_t T = teacher_ids.size(1), K = teacher_ids.size(2);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t* ids = teacher_ids.data_ptr<int64_t>();
  const float* sc = teacher_scores.data_ptr<float>();
  const float* tw = teacher_weights.data_ptr<float>();
  const float* rw = rank_ptr(rank_weights);
  const DotLogit logit = dot_logit(in);
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const LseState& st = states[b];
      const double l1 = st.lse1(), lt = same_tau ? l1 : st.lse_tau(inv_tau);
      const TeacherRow r = teacher_row(ids, sc, tw, rw, T, K, b);
      loss_p[b] = float(row_loss(r, tgt[b], l1, lt, P, [&](int64_t j, int64_t) { return logit(b, j); }));
      lse1_p[b] = float(l1);
      lset_p[b] = float(lt);
    }
  });
  return {loss, lse1, lse_tau};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_linear_bwd(
    const at::Tensor& grad_rows, const at::Tensor& user_emb, const at::Tensor& item_emb,
    const c10::optional<at::Tensor>& item_bias, const at::Tensor& lse1, const at::Tensor& lse_tau,
    const at::Tensor& target, const at::Tensor& teacher_ids, const at::Tensor& teacher_scores,
    const at::Tensor& teacher_weights, const c10::optional<at::Tensor>& rank_weights, double temperature,
    double lambda_ce, double lambda_kd, double lambda_rank) {
  const LinearInputs in = prepare_linear(user_emb, item_emb, item_bias);
  const int64_t B = in.B, C = in.C, d = in.d;
  check_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights, rank_weights, B);
  for (const at::Tensor* t : {&grad_rows, &lse1, &lse_tau})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "prmkd: grad_rows / lse1 / lse_tau must be contiguous float32 [B=", B, "], got ", t->sizes(), " ",
                t->scalar_type());
  const LossParams P = make_params(temperature, lambda_ce, lambda_kd, lambda_rank);
  const bool same_tau = P.same_tau();
  const float inv_tau = float(1.0 / P.tau);
  const int64_t T = teacher_ids.size(1), K = teacher_ids.size(2);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t* ids = teacher_ids.data_ptr<int64_t>();
  const float* sc = teacher_scores.data_ptr<float>();
  const float* tw = teacher_weights.data_ptr<float>();
  const float* rw = rank_ptr(rank_weights);
  const float* g_p = grad_rows.data_ptr<float>();
  const float* lse1_p = lse1.data_ptr<float>();
  const float* lset_p = lse_tau.data_ptr<float>();

  // dense coefficients per row: d l / d s_j = a_b softmax_1 + c_b softmax_tau (+ sparse)
  std::vector<float> coef_a(B), coef_c(B);
  for (int64_t b = 0; b < B; ++b) {
    double a, c;
    row_dense_coefs(teacher_row(ids, sc, tw, rw, T, K, b), tgt[b], g_p[b], P, &a, &c);
    coef_a[b] = float(a);
    coef_c[b] = float(c);
  }

  // sparse corrections at the target / teacher ids (the rank term needs the logit there: a dot product)
  const int64_t slots = 1 + T * K;
  std::vector<int64_t> sp_id(B * slots, -1);
  std::vector<float> sp_delta(B * slots, 0.0f);
  const DotLogit logit = dot_logit(in);
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t n_emitted = 0;
      row_sparse_grad(
          teacher_row(ids, sc, tw, rw, T, K, b), tgt[b], g_p[b], P, [&](int64_t j, int64_t) { return logit(b, j); },
          [&](int64_t j, int64_t, double delta) {
            sp_id[b * slots + n_emitted] = j;
            sp_delta[b * slots + n_emitted] = float(delta);
            ++n_emitted;
          });
    }
  });

  // dense part, with the sparse entries added into each logits-gradient block before its GEMMs
  TileBuckets sparse(sp_id.data(), B, slots, C);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor d_item = at::zeros({C, d}, opts);
  at::Tensor d_bias = at::zeros({C}, opts);
  at::Tensor d_user = linear_dense_grad(in, coef_a.data(), coef_c.data(), lse1_p, lset_p, inv_tau, same_tau,
                                        d_item, d_bias, sparse, sp_delta.data());

  const at::ScalarType dt = user_emb.scalar_type();
  at::Tensor d_bias_out = in.bias.defined() ? d_bias.to(item_bias->scalar_type()) : at::empty({0}, opts);
  return {d_user.to(dt), d_item.to(dt), d_bias_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(prmkd, CPU, m) {
  m.impl("kd_loss_linear_fwd", &kd_loss_linear_fwd);
  m.impl("kd_loss_linear_bwd", &kd_loss_linear_bwd);
}

}  // namespace prmkd
