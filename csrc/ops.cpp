// Schemas of the torch ops `torch.ops.prmkd.*` and the Python module `prmkd_dist._C` whose import
// loads this library and so registers them. The CPU kernels are registered next to their code
// (kd_loss.cpp, kd_loss_linear.cpp, kd_rows.cpp, kd_catalog_local.cpp, route.cpp); autograd is attached in prmkd_dist/distill/cpp_backend.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(prmkd, m) {
  // -> (loss_rows [B] f32, lse1 [B] f32, lse_tau [B] f32); the LSEs are saved for the backward
  m.def(
      "kd_loss_fwd(Tensor logits, Tensor target, Tensor teacher_ids, Tensor teacher_scores, "
      "Tensor teacher_weights, Tensor? rank_weights, float temperature, float lambda_ce, float lambda_kd, "
      "float lambda_rank) -> (Tensor, Tensor, Tensor)");
  // -> d loss / d logits, in logits' dtype
  m.def(
      "kd_loss_bwd(Tensor grad_rows, Tensor logits, Tensor lse1, Tensor lse_tau, Tensor target, "
      "Tensor teacher_ids, Tensor teacher_scores, Tensor teacher_weights, Tensor? rank_weights, "
      "float temperature, float lambda_ce, float lambda_kd, float lambda_rank) -> Tensor");
  m.def(
      "kd_loss_linear_fwd(Tensor user_emb, Tensor item_emb, Tensor? item_bias, Tensor target, "
      "Tensor teacher_ids, Tensor teacher_scores, Tensor teacher_weights, Tensor? rank_weights, "
      "float temperature, float lambda_ce, float lambda_kd, float lambda_rank) -> (Tensor, Tensor, Tensor)");
  // -> (d user_emb, d item_emb, d item_bias); d item_bias is an empty [0] tensor when item_bias is None
  m.def(
      "kd_loss_linear_bwd(Tensor grad_rows, Tensor user_emb, Tensor item_emb, Tensor? item_bias, Tensor lse1, "
      "Tensor lse_tau, Tensor target, Tensor teacher_ids, Tensor teacher_scores, Tensor teacher_weights, "
      "Tensor? rank_weights, float temperature, float lambda_ce, float lambda_kd, float lambda_rank) "
      "-> (Tensor, Tensor, Tensor)");
  // the row loss from per-row statistics (catalog-parallel form): lse1, lse_tau [B] and sel [B, 1 + T*K]
  // (logits at the target, then at teacher slot (t, k) in column 1 + t*K + k), all float32 -> loss_rows [B]
  m.def(
      "kd_rows_fwd(Tensor lse1, Tensor lse_tau, Tensor sel, Tensor target, Tensor teacher_ids, "
      "Tensor teacher_scores, Tensor teacher_weights, Tensor? rank_weights, float temperature, float lambda_ce, "
      "float lambda_kd, float lambda_rank) -> Tensor");
  // -> (d lse1 [B], d lse_tau [B], d sel [B, 1 + T*K]), float32
  m.def(
      "kd_rows_bwd(Tensor grad_rows, Tensor sel, Tensor target, Tensor teacher_ids, Tensor teacher_scores, "
      "Tensor teacher_weights, Tensor? rank_weights, float temperature, float lambda_ce, float lambda_kd, "
      "float lambda_rank) -> (Tensor, Tensor, Tensor)");
  // catalog-parallel local part over a row shard [R, d] (R may be 0) holding global items [id_offset,
  // id_offset + R):
  // -> (local max [B], sum exp(s - max) [B], sum exp((s - max) / tau) [B]), all float64, and the logits at the
  // GLOBAL ids sel_idx [B, M] that fall on this shard as float32 [B, M] (0 elsewhere: other shards' ids and
  // -1 = none; [B, 0] without sel_idx). With sel_ptr [B + 1] (int64) the ids come in CSR form, sel_idx [E] (int64
  // or int32) with row b's at sel_ptr[b] .. sel_ptr[b + 1] - 1, and the picked logits are [E]
  m.def("kd_catalog_local_stats(Tensor user_emb, Tensor item_emb, Tensor? item_bias, float temperature, "
        "Tensor? sel_idx=None, int id_offset=0, Tensor? sel_ptr=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> (local d user_emb [B, d], d item_emb [R, d], d item_bias [R] or [0] without bias), all float32
  m.def(
      "kd_catalog_local_grad(Tensor user_emb, Tensor item_emb, Tensor? item_bias, Tensor coef_lse1, "
      "Tensor coef_lse_tau, Tensor lse1, Tensor lse_tau, Tensor sparse_idx, Tensor sparse_grad, "
      "float temperature, int id_offset=0, Tensor? sparse_ptr=None) -> (Tensor, Tensor, Tensor)");
  // sparse_idx: global ids as above, [B, M] or, with sparse_ptr, CSR [E] (int64 or int32; sparse_grad of
  // sparse_idx's shape)
  // the ids [b, M] of a rank's rows grouped by the rank that owns them (rank q: items [lo[q], hi[q])), for one
  // all-to-all -> (send int32, splits int64 [W], pos int64): route.cpp
  // (head [b]: an optional first column in front of ids, M = 1 + ids.size(1))
  m.def("route_by_owner(Tensor ids, Tensor lo, Tensor hi, Tensor? head=None) -> (Tensor, Tensor, Tensor)");
}

namespace prmkd {
void bind_shard_rows(pybind11::module_& m);  // shard_rows.cpp
}

// `import prmkd_dist._C` loads this library, which registers the torch ops above; the module itself holds the
// loader's window-assembly functions (shard_rows.cpp), which work on numpy/Arrow buffers, not tensors.
PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ CPU ops of prmkd-dist (torch.ops.prmkd) and the loader's window assembly";
  prmkd::bind_shard_rows(m);
}
