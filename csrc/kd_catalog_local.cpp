// prmkd::kd_catalog_local_stats / prmkd::kd_catalog_local_grad: the local part of the catalog-parallel loss
// (prmkd_dist/parallel/catalog_loss.py), where each rank holds a contiguous shard of R rows of the item table.
//
// The loss needs only per-row statistics of the full [B, C] logits; a rank computes its share of them over its
// own rows, tile by tile with the same passes as the fused-linear op (kd_common.h), never holding [B, R]:
//   stats: the local max m_b and, relative to it, sum_j exp(s_bj - m_b) and sum_j exp((s_bj - m_b) / tau);
//          the caller all-reduces them into the global LSE_1 and LSE_tau.
//   grad:  given the global LSEs and the upstream gradients g1_b = dL/dLSE_1, gt_b = dL/dLSE_tau and
//          dL/ds at a few (row, item) pairs (the target / teacher logits; global ids, the op keeps its own),
//            dS_bj = g1_b softmax_1(s_b)_j + gt_b / tau softmax_tau(s_b)_j + sparse entries,
//          and returns dS @ shard (this rank's contribution to d user_emb), dS^T @ user_emb (d of its own rows)
//          and the column sums of dS (d of its own bias).
// The selected pairs come dense, ids [B, M] (every rank sees every row's ids and keeps its own), or, with a row
// pointer, as CSR: ids [E] and ptr [B + 1], row b's at ptr[b] .. ptr[b + 1] - 1 (the ids routed to their owner
// by an all-to-all, so a rank scans only its own share; catalog_loss.py).
// Arithmetic is float32 (bfloat16 embeddings are upcast once, O(R d)); the statistics come back in float64
// because the all-reduce adds them across ranks.
#include <torch/library.h>

#include "kd_common.h"

namespace prmkd {
namespace {

// Global ids are >= -1 (-1 = empty slot); which ones are this shard's is the op's business, not an error.
// `slots` = 0: a 1-d list (the message names the entry, not a (row, slot)).
template <class Id>
void check_global_ids(const Id* id, int64_t n, int64_t slots, const char* name) {
  int64_t bad = -1;
  for (int64_t i = 0; i < n; ++i) bad = (id[i] < -1 && bad < 0) ? i : bad;
  if (bad < 0) return;
  if (slots == 0)
    TORCH_CHECK(false, "prmkd: ", name, "[", bad, "] = ", id[bad], ": item ids must be >= -1 (-1 = empty slot)");
  TORCH_CHECK(false, "prmkd: ", name, "[", bad / slots, ", ", bad % slots, "] = ", id[bad],
              ": item ids must be >= -1 (-1 = empty slot)");
}

// The selected (row, id) pairs of either form, checked, as TileBuckets of this shard's entries; `out_shape`
// gets the shape of the per-entry tensors ([B, M] dense, [E] in CSR form).
TileBuckets selected_buckets(const at::Tensor& ids, const c10::optional<at::Tensor>& ptr, int64_t B, int64_t R,
                             int64_t id_offset, const char* name, std::vector<int64_t>& out_shape) {
  TORCH_CHECK(id_offset >= 0, "prmkd: id_offset must be >= 0, got ", id_offset);
  if (!ptr.has_value()) {
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "prmkd: ", name,
                " must be a contiguous int64 tensor, got ", ids.scalar_type());
    TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B, "prmkd: ", name, " must be [B=", B, ", M], got ", ids.sizes());
    const int64_t* id = ids.data_ptr<int64_t>();
    check_global_ids(id, ids.numel(), ids.size(1), name);
    out_shape = {B, ids.size(1)};
    return TileBuckets(id, B, ids.size(1), R, id_offset);
  }
  // CSR: int64, or int32 as the routed ids arrive (rows of one shard; no widening copy)
  TORCH_CHECK((ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt) && ids.is_contiguous(), "prmkd: ",
              name, " with a row pointer must be a contiguous int64 or int32 tensor, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1, "prmkd: ", name, " with a row pointer must be 1-d [E], got ", ids.sizes());
  TORCH_CHECK(ptr->dim() == 1 && ptr->size(0) == B + 1 && ptr->scalar_type() == at::kLong && ptr->is_contiguous(),
              "prmkd: the row pointer of ", name, " must be a contiguous int64 [B + 1 = ", B + 1, "] tensor, got ",
              ptr->sizes(), " ", ptr->scalar_type());
  const int64_t* p = ptr->data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0 && p[B] == ids.size(0), "prmkd: the row pointer of ", name, " must run from 0 to E = ",
              ids.size(0), ", got ", p[0], " .. ", p[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(p[b] <= p[b + 1], "prmkd: the row pointer of ", name, " decreases at row ", b, " (", p[b], " > ",
                p[b + 1], ")");
  out_shape = {ids.size(0)};
  if (ids.scalar_type() == at::kInt) {
    const int32_t* id = ids.data_ptr<int32_t>();
    check_global_ids(id, ids.size(0), 0, name);
    return TileBuckets(id, p, B, R, id_offset);
  }
  const int64_t* id = ids.data_ptr<int64_t>();
  check_global_ids(id, ids.size(0), 0, name);
  return TileBuckets(id, p, B, R, id_offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_catalog_local_stats(
    const at::Tensor& user_emb, const at::Tensor& item_emb, const c10::optional<at::Tensor>& item_bias,
    double temperature, const c10::optional<at::Tensor>& sel_idx, int64_t id_offset,
    const c10::optional<at::Tensor>& sel_ptr) {
  const LinearInputs in = prepare_linear(user_emb, item_emb, item_bias, /*allow_empty=*/true);
  const int64_t B = in.B, R = in.C;
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "prmkd: temperature must be > 0 and finite, got ",
              temperature);
  const bool same_tau = temperature == 1.0;
  const float inv_tau = float(1.0 / temperature);

  // logits at selected (row, local item) pairs, picked out of the logits blocks as the pass forms them (no
  // [B, M, d] gather), through the entries bucketed by item tile; ids are global: those outside
  // [id_offset, id_offset + R) are other shards' (or -1, none) and skipped
  TORCH_CHECK(sel_idx.has_value() || !sel_ptr.has_value(), "prmkd: sel_ptr given without sel_idx");
  std::vector<int64_t> sel_shape{B, 0};
  TileBuckets buckets;
  if (sel_idx.has_value()) buckets = selected_buckets(*sel_idx, sel_ptr, B, R, id_offset, "sel_idx", sel_shape);
  // (from the scratch pool: a few MiB each step, see pooled_empty)
  const int64_t n_sel = sel_shape.size() == 1 ? sel_shape[0] : sel_shape[0] * sel_shape[1];
  at::Tensor sel = pooled_empty(n_sel, at::kFloat).zero_().view(sel_shape);
  float* sel_p = sel.data_ptr<float>();
  const bool pick = !buckets.empty();
  const std::vector<LseState> states = linear_row_states(
      in, inv_tau, same_tau, [&](int64_t r0, int64_t m, int64_t c0, int64_t n, const float* logits) {
        if (!pick) return;
        buckets.visit_block(c0 / kTileItems, r0,
                            [&](int64_t flat, int64_t r, int64_t col) { sel_p[flat] = logits[r * n + col]; });
      });
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor m = at::empty({in.B}, opts), s1 = at::empty({in.B}, opts), st = at::empty({in.B}, opts);
  double* m_p = m.data_ptr<double>();
  double* s1_p = s1.data_ptr<double>();
  double* st_p = st.data_ptr<double>();
  for (int64_t b = 0; b < in.B; ++b) {
    m_p[b] = states[b].m;  // -inf (with zero sums) for a shard without rows
    s1_p[b] = states[b].s1;
    st_p[b] = states[b].s_tau;
  }
  return {m, s1, st, sel};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_catalog_local_grad(
    const at::Tensor& user_emb, const at::Tensor& item_emb, const c10::optional<at::Tensor>& item_bias,
    const at::Tensor& coef_lse1, const at::Tensor& coef_lse_tau, const at::Tensor& lse1, const at::Tensor& lse_tau,
    const at::Tensor& sparse_idx, const at::Tensor& sparse_grad, double temperature, int64_t id_offset,
    const c10::optional<at::Tensor>& sparse_ptr) {
  const LinearInputs in = prepare_linear(user_emb, item_emb, item_bias, /*allow_empty=*/true);
  const int64_t B = in.B, R = in.C, d = in.d;
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "prmkd: temperature must be > 0 and finite, got ",
              temperature);
  for (const at::Tensor* t : {&coef_lse1, &coef_lse_tau, &lse1, &lse_tau})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "prmkd: coef_lse1 / coef_lse_tau / lse1 / lse_tau must be contiguous float32 [B=", B, "], got ",
                t->sizes(), " ", t->scalar_type());
  std::vector<int64_t> shape;
  TileBuckets sparse = selected_buckets(sparse_idx, sparse_ptr, B, R, id_offset, "sparse_idx", shape);  // own ids
  TORCH_CHECK(sparse_grad.sizes() == sparse_idx.sizes() && sparse_grad.scalar_type() == at::kFloat &&
                  sparse_grad.is_contiguous(),
              "prmkd: sparse_grad must be a contiguous float32 tensor of sparse_idx's shape ", sparse_idx.sizes(),
              ", got ", sparse_grad.sizes(), " ", sparse_grad.scalar_type());

  const bool same_tau = temperature == 1.0;  // then lse_tau = lse1 and one exp serves both terms
  const float inv_tau = float(1.0 / temperature);
  std::vector<float> coef_c(B);
  const float* gt = coef_lse_tau.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) coef_c[b] = gt[b] * inv_tau;  // d LSE_tau / d s_j = softmax_tau(s)_j / tau

  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor d_item = at::zeros({R, d}, opts);
  at::Tensor d_bias = at::zeros({R}, opts);
  at::Tensor d_user = linear_dense_grad(in, coef_lse1.data_ptr<float>(), coef_c.data(), lse1.data_ptr<float>(),
                                        lse_tau.data_ptr<float>(), inv_tau, same_tau, d_item, d_bias, sparse,
                                        sparse_grad.data_ptr<float>());
  return {d_user.contiguous(), d_item, in.bias.defined() ? d_bias : at::empty({0}, opts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(prmkd, CPU, m) {
  m.impl("kd_catalog_local_stats", &kd_catalog_local_stats);
  m.impl("kd_catalog_local_grad", &kd_catalog_local_grad);
}

}  // namespace prmkd
