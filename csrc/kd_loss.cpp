// prmkd::kd_loss_fwd / prmkd::kd_loss_bwd: the distillation loss on given logits [B, C] (float32 or bfloat16).
//
// Rows are independent, so both passes run in parallel over rows (at::parallel_for, torch's OpenMP pool).
// Memory traffic is the point: the forward reads each row once (in L1-sized runs: max, then the two
// exp-sums, folded into an online LSE), the backward reads it once more and writes the gradient once,
// then applies the few sparse corrections at the target and teacher ids in place.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "kd_common.h"

namespace prmkd {
namespace {

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "prmkd: logits must be [B, C], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "prmkd: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.is_contiguous() && logits.device().is_cpu(), "prmkd: logits must be a contiguous CPU tensor");
  TORCH_CHECK(logits.size(1) > 0, "prmkd: logits need at least one column");
}

// Reads row b of the logits as float32: a pointer into the tensor for float32, a conversion into buf for bf16.
struct RowReader {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  int64_t C;

  RowReader(const at::Tensor& logits) : C(logits.size(1)) {
    if (logits.scalar_type() == at::kFloat)
      f32 = logits.data_ptr<float>();
    else
      bf16 = reinterpret_cast<const uint16_t*>(logits.data_ptr<at::BFloat16>());
  }
  // the run [j0, j0 + n) of row b as float32 (buf must hold n floats)
  const float* run(int64_t b, int64_t j0, int64_t n, float* buf) const {
    if (f32) return f32 + b * C + j0;
    bf16_to_float(bf16 + b * C + j0, buf, n);
    return buf;
  }
  float at(int64_t b, int64_t j) const {
    if (f32) return f32[b * C + j];
    float v;
    bf16_to_float(bf16 + b * C + j, &v, 1);
    return v;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                           const at::Tensor& teacher_ids,
                                                           const at::Tensor& teacher_scores,
                                                           const at::Tensor& teacher_weights,
                                                           const c10::optional<at::Tensor>& rank_weights,
                                                           double temperature, double lambda_ce, double lambda_kd,
                                                           double lambda_rank) {
  check_logits(logits);
  const int64_t B = logits.size(0), C = logits.size(1);
  check_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights, rank_weights, B);
  const LossParams P = make_params(temperature, lambda_ce, lambda_kd, lambda_rank);
  const int64_t T = teacher_ids.size(1), K = teacher_ids.size(2);
  const bool same_tau = P.same_tau();
  const float inv_tau = float(1.0 / P.tau);

  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B}, opts), lse1 = at::empty({B}, opts), lse_tau = at::empty({B}, opts);
  float* loss_p = loss.data_ptr<float>();
  float* lse1_p = lse1.data_ptr<float>();
  float* lset_p = lse_tau.data_ptr<float>();
  const RowReader reader(logits);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t* ids = teacher_ids.data_ptr<int64_t>();
  const float* sc = teacher_scores.data_ptr<float>();
  const float* tw = teacher_weights.data_ptr<float>();
  const float* rw = rank_ptr(rank_weights);

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(reader.bf16 ? kChunk : 0);
    for (int64_t b = b0; b < b1; ++b) {
      LseState st;
      for (int64_t j0 = 0; j0 < C; j0 += kChunk) {
        const int64_t n = std::min(kChunk, C - j0);
        st.update(reader.run(b, j0, n, buf.data()), n, inv_tau, same_tau);
      }
      const double l1 = st.lse1(), lt = same_tau ? l1 : st.lse_tau(inv_tau);
      const TeacherRow r = teacher_row(ids, sc, tw, rw, T, K, b);
      loss_p[b] = float(row_loss(r, tgt[b], l1, lt, P, [&](int64_t j, int64_t) { return reader.at(b, j); }));
      lse1_p[b] = float(l1);
      lset_p[b] = float(lt);
    }
  });
  return {loss, lse1, lse_tau};
}

at::Tensor kd_loss_bwd(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& lse1,
                       const at::Tensor& lse_tau, const at::Tensor& target, const at::Tensor& teacher_ids,
                       const at::Tensor& teacher_scores, const at::Tensor& teacher_weights,
                       const c10::optional<at::Tensor>& rank_weights, double temperature, double lambda_ce,
                       double lambda_kd, double lambda_rank) {
  check_logits(logits);
  const int64_t B = logits.size(0), C = logits.size(1);
  check_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights, rank_weights, B);
  for (const at::Tensor* t : {&grad_rows, &lse1, &lse_tau})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "prmkd: grad_rows / lse1 / lse_tau must be contiguous float32 [B=", B, "], got ", t->sizes(), " ",
                t->scalar_type());
  const LossParams P = make_params(temperature, lambda_ce, lambda_kd, lambda_rank);
  const int64_t T = teacher_ids.size(1), K = teacher_ids.size(2);
  const bool same_tau = P.same_tau();
  const float inv_tau = float(1.0 / P.tau);

  at::Tensor grad = empty_large(logits.sizes(), logits.scalar_type());
  const bool is_bf16 = logits.scalar_type() == at::kBFloat16;
  float* g_f32 = is_bf16 ? nullptr : grad.data_ptr<float>();
  uint16_t* g_bf16 = is_bf16 ? reinterpret_cast<uint16_t*>(grad.data_ptr<at::BFloat16>()) : nullptr;
  const RowReader reader(logits);
  const float* g_p = grad_rows.data_ptr<float>();
  const float* lse1_p = lse1.data_ptr<float>();
  const float* lset_p = lse_tau.data_ptr<float>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t* ids = teacher_ids.data_ptr<int64_t>();
  const float* sc = teacher_scores.data_ptr<float>();
  const float* tw = teacher_weights.data_ptr<float>();
  const float* rw = rank_ptr(rank_weights);

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    // bf16: the whole row's gradient is built in float32 (dense + sparse), then rounded once
    std::vector<float> in_buf(is_bf16 ? kChunk : 0), row_buf(is_bf16 ? C : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const TeacherRow r = teacher_row(ids, sc, tw, rw, T, K, b);
      double a, c;
      row_dense_coefs(r, tgt[b], g_p[b], P, &a, &c);
      float* out = is_bf16 ? row_buf.data() : g_f32 + b * C;
      for (int64_t j0 = 0; j0 < C; j0 += kChunk) {
        const int64_t n = std::min(kChunk, C - j0);
        vec_softmax_mix(reader.run(b, j0, n, in_buf.data()), n, float(a), lse1_p[b], float(c), inv_tau, lset_p[b],
                        same_tau, out + j0);
      }
      row_sparse_grad(
          r, tgt[b], g_p[b], P, [&](int64_t j, int64_t) { return reader.at(b, j); },
          [&](int64_t j, int64_t, double d) { out[j] += float(d); });
      if (is_bf16) float_to_bf16(out, g_bf16 + b * C, C);
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(prmkd, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd);
  m.impl("kd_loss_bwd", &kd_loss_bwd);
}

}  // namespace prmkd
