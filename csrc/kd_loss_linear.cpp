// prmkd::kd_loss_linear_fwd / prmkd::kd_loss_linear_bwd: the distillation loss on
// logits = user_emb @ item_emb.T (+ item_bias) without ever holding the [B, C] logits.
//
// The catalog is cut into item tiles of kTileItems rows of item_emb; the tiles are split into one contiguous
// share per thread (parallel over tiles, not rows: each thread then streams its own part of item_emb once and
// the item gradient of a tile has a single writer). Inside a share, a tile is multiplied with a block of
// kTileRows users at a time by BLAS (at::mm, single-threaded inside the parallel region), so the logits block
// [kTileRows, kTileItems] (256 KiB) stays in cache while it is consumed:
//   forward:  per-thread online LSEs (merged across threads at the end);
//   backward: the block is recomputed, turned in place into d loss / d logits, then
//             d user += dS @ item_tile (per-thread accumulator, summed at the end),
//             d item_tile += dS^T @ user_block, d bias_tile += column sums of dS.
// The target / teacher logits (the sparse part) are dot products. Memory: O(B d + C d + B T K + threads * B d).
// bfloat16 embeddings are upcast to float32 once (O(C d)); all arithmetic is float32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "kd_common.h"

namespace prmkd {
namespace {

constexpr int64_t kTileItems = 512;
constexpr int64_t kTileRows = 128;

struct LinearInputs {
  at::Tensor user, item, bias;  // float32 contiguous; bias undefined when absent
  int64_t B, C, d;
};

LinearInputs prepare(const at::Tensor& user_emb, const at::Tensor& item_emb, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(user_emb.dim() == 2 && item_emb.dim() == 2 && user_emb.size(1) == item_emb.size(1),
              "prmkd: user_emb [B, d] and item_emb [C, d] must share d, got ", user_emb.sizes(), " and ",
              item_emb.sizes());
  TORCH_CHECK(user_emb.scalar_type() == item_emb.scalar_type() &&
                  (user_emb.scalar_type() == at::kFloat || user_emb.scalar_type() == at::kBFloat16),
              "prmkd: user_emb and item_emb must both be float32 or both bfloat16, got ", user_emb.scalar_type(),
              " and ", item_emb.scalar_type());
  TORCH_CHECK(user_emb.device().is_cpu() && item_emb.device().is_cpu(), "prmkd: embeddings must be CPU tensors");
  TORCH_CHECK(item_emb.size(0) > 0, "prmkd: item_emb needs at least one item");
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

DotLogit dot_logit(const LinearInputs& in) {
  return DotLogit{in.user.data_ptr<float>(), in.item.data_ptr<float>(),
                  in.bias.defined() ? in.bias.data_ptr<float>() : nullptr, in.d};
}

// Calls body(share, tile_begin, tile_end) for each thread's contiguous share of the item tiles, in parallel.
template <class Body>
void for_each_share(int64_t C, int64_t n_shares, Body&& body) {
  const int64_t n_tiles = (C + kTileItems - 1) / kTileItems;
  at::parallel_for(0, n_shares, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) body(s, s * n_tiles / n_shares, (s + 1) * n_tiles / n_shares);
  });
}

int64_t share_count(int64_t C) {
  const int64_t n_tiles = (C + kTileItems - 1) / kTileItems;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
}

// logits block = user[r0:r0+m] @ item[c0:c0+n].T (+ bias[c0:c0+n]) into buf (m x n, row-major).
at::Tensor logits_block(const LinearInputs& in, int64_t r0, int64_t m, int64_t c0, int64_t n, float* buf) {
  at::Tensor out = at::from_blob(buf, {m, n}, at::TensorOptions().dtype(at::kFloat));
  const at::Tensor u = in.user.narrow(0, r0, m), it = in.item.narrow(0, c0, n).t();
  if (in.bias.defined())
    at::addmm_out(out, in.bias.narrow(0, c0, n), u, it);
  else
    at::mm_out(out, u, it);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_linear_fwd(
    const at::Tensor& user_emb, const at::Tensor& item_emb, const c10::optional<at::Tensor>& item_bias,
    const at::Tensor& target, const at::Tensor& teacher_ids, const at::Tensor& teacher_scores,
    const at::Tensor& teacher_weights, const c10::optional<at::Tensor>& rank_weights, double temperature,
    double lambda_ce, double lambda_kd, double lambda_rank) {
  const LinearInputs in = prepare(user_emb, item_emb, item_bias);
  const int64_t B = in.B, C = in.C;
  check_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights, rank_weights, B);
  const LossParams P = make_params(temperature, lambda_ce, lambda_kd, lambda_rank);
  const bool same_tau = P.same_tau();
  const float inv_tau = float(1.0 / P.tau);

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
        for (int64_t r = 0; r < m; ++r) st[r0 + r].update(buf.data() + r * n, n, inv_tau, same_tau);
      }
    }
  });

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
      LseState st = states[b];
      for (int64_t s = 1; s < n_shares; ++s) st.merge(states[s * B + b], inv_tau);
      const double l1 = st.lse1(), lt = same_tau ? l1 : st.lse_tau(inv_tau);
      const TeacherRow r = teacher_row(ids, sc, tw, rw, T, K, b);
      loss_p[b] = float(row_loss(r, tgt[b], l1, lt, P, [&](int64_t j) { return logit(b, j); }));
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
  const LinearInputs in = prepare(user_emb, item_emb, item_bias);
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

  auto opts = at::TensorOptions().dtype(at::kFloat);
  const int64_t n_shares = share_count(C);
  at::Tensor d_user_shares = at::zeros({n_shares, B, d}, opts);
  at::Tensor d_item = at::zeros({C, d}, opts);
  at::Tensor d_bias = at::zeros({C}, opts);
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
          vec_softmax_mix(row, n, coef_a[b], lse1_p[b], coef_c[b], inv_tau, lset_p[b], same_tau, row);
          vec_add(d_bias_p + c0, row, n);
        }
        d_user.narrow(0, r0, m).addmm_(ds, in.item.narrow(0, c0, n));
        d_item_tile.addmm_(ds.t(), in.user.narrow(0, r0, m));
      }
    }
  });
  at::Tensor d_user = n_shares == 1 ? d_user_shares[0] : d_user_shares.sum(0);

  // sparse corrections at the target / teacher ids: d user per row in parallel (one writer per row),
  // the scattered d item / d bias rows serially (ids repeat across rows)
  const int64_t slots = 1 + T * K;
  std::vector<int64_t> sp_id(B * slots, -1);
  std::vector<float> sp_delta(B * slots, 0.0f);
  const DotLogit logit = dot_logit(in);
  float* du = d_user.data_ptr<float>();
  const float* item_p = in.item.data_ptr<float>();
  const float* user_p = in.user.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t n_emitted = 0;
      float* du_b = du + b * d;
      row_sparse_grad(
          teacher_row(ids, sc, tw, rw, T, K, b), tgt[b], g_p[b], P, [&](int64_t j) { return logit(b, j); },
          [&](int64_t j, double delta) {
            sp_id[b * slots + n_emitted] = j;
            sp_delta[b * slots + n_emitted] = float(delta);
            ++n_emitted;
            const float* it = item_p + j * d;
            const float fd = float(delta);
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) du_b[k] += fd * it[k];
          });
    }
  });
  float* di = d_item.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* u = user_p + b * d;
    for (int64_t s = 0; s < slots; ++s) {
      const int64_t j = sp_id[b * slots + s];
      if (j < 0) break;
      const float fd = sp_delta[b * slots + s];
      float* di_j = di + j * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) di_j[k] += fd * u[k];
      d_bias_p[j] += fd;
    }
  }

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
