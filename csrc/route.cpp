// prmkd::route_by_owner: the sending side of the catalog-parallel loss's all-to-all (prmkd_dist/parallel/routing.py).
//
// A rank holds the selected ids [b, M] of its own rows (global item ids, -1 = empty slot: the target and the
// teachers' lists; the target column may come separately, `head`); rank q owns items [lo_q, hi_q) of the row-sharded item table. Instead of all-gathering every
// rank's ids to every rank (each then scans W times its own share), each id goes to its owner only. One serial
// pass counts the entries per (owner, row), a second writes them out grouped by owner, rows and slots ascending:
//   send   int32 [sum_q (b + E_q)]: for each owner q in rank order, the b per-row counts of the E_q entries q owns,
//          then those entries' ids minus lo_q (the owner's local rows; a shard holds < 2^31 rows), so that one
//          all_to_all_single carries everything and the owner rebuilds a CSR of its entries;
//   splits int64 [W]: b + E_q, the send splits;
//   pos    int64 [sum_q E_q]: each sent entry's flat index r * M + s in ids, in send order, where the owners'
//          answers (the logits at those ids) are put back and from where their gradients are taken.
// An id >= 0 inside no rank's range is an error naming it (the loss's input checks report it first when on).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kd_common.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace prmkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_by_owner(const at::Tensor& ids, const at::Tensor& lo,
                                                              const at::Tensor& hi,
                                                              const c10::optional<at::Tensor>& head) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.device().is_cpu(),
              "prmkd: route_by_owner: ids must be a contiguous int64 CPU [b, M] tensor, got ", ids.sizes(), " ",
              ids.scalar_type(), " on ", ids.device());
  // head [b]: a first column in front of ids (the target before the teachers' slots), read where it lies
  // instead of concatenated by the caller (a copy of every id per step)
  const bool has_head = head.has_value();
  TORCH_CHECK(!has_head || (head->dim() == 1 && head->size(0) == ids.size(0) && head->scalar_type() == at::kLong &&
                            head->is_contiguous() && head->device().is_cpu()),
              "prmkd: route_by_owner: head must be a contiguous int64 CPU [b = ", ids.size(0), "] tensor, got ",
              has_head ? head->sizes() : at::IntArrayRef{}, " ", has_head ? head->scalar_type() : at::kLong);
  TORCH_CHECK(lo.dim() == 1 && hi.sizes() == lo.sizes() && lo.scalar_type() == at::kLong &&
                  hi.scalar_type() == at::kLong && lo.is_contiguous() && hi.is_contiguous(),
              "prmkd: route_by_owner: lo and hi must be contiguous int64 [W] tensors, got ", lo.sizes(), " and ",
              hi.sizes());
  const int64_t W = lo.size(0), b = ids.size(0), S = ids.size(1), M = S + (has_head ? 1 : 0);
  TORCH_CHECK(W >= 1, "prmkd: route_by_owner: no ranks");
  TORCH_CHECK(M < std::numeric_limits<int32_t>::max(), "prmkd: route_by_owner: ", M, " slots per row exceed int32");
  const int64_t* lo_p = lo.data_ptr<int64_t>();
  const int64_t* hi_p = hi.data_ptr<int64_t>();
  // the non-empty ranges sorted by start: owner lookup by binary search (W is small; ranges do not overlap)
  std::vector<int64_t> order;
  for (int64_t q = 0; q < W; ++q) {
    TORCH_CHECK(lo_p[q] >= 0 && hi_p[q] >= lo_p[q] && hi_p[q] - lo_p[q] < std::numeric_limits<int32_t>::max(),
                "prmkd: route_by_owner: rank ", q, " holds items [", lo_p[q], ", ", hi_p[q],
                "): expected 0 <= lo <= hi and fewer than 2^31 - 1 rows");
    if (hi_p[q] > lo_p[q]) order.push_back(q);
  }
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return lo_p[x] < lo_p[y]; });
  std::vector<int64_t> starts(order.size());
  for (size_t i = 0; i < order.size(); ++i) starts[i] = lo_p[order[i]];

  // owner lookup: the position among the sorted starts, branch-free for the usual few ranges
  const int64_t n_ranges = int64_t(starts.size());
  auto range_of = [&](int64_t v) -> int64_t {  // index into `order` of the last start <= v, or -1
    if (n_ranges <= 16) {
      int64_t k = 0;
      for (int64_t j = 0; j < n_ranges; ++j) k += v >= starts[j];
      return k - 1;
    }
    return int64_t(std::upper_bound(starts.begin(), starts.end(), v) - starts.begin()) - 1;
  };
  std::vector<int64_t> rank_of(n_ranges);  // range index -> rank, and each range's end
  std::vector<int64_t> end_of(n_ranges);
  for (int64_t k = 0; k < n_ranges; ++k) rank_of[k] = order[k], end_of[k] = hi_p[order[k]];

  // ranges without gaps (the catalog-parallel loss's tile the catalog): an id is then valid iff it is -1 or in
  // [first start, last end), and the few-ranges passes below need no lookup of its range's end
  bool contiguous = n_ranges <= 16;
  for (int64_t k = 1; k < n_ranges; ++k) contiguous = contiguous && starts[k] == end_of[k - 1];
  const int64_t first_start = n_ranges ? starts[0] : 0, last_end = n_ranges ? end_of[n_ranges - 1] : 0;

  // two passes over the ids: count per (owner, row), then write each entry at its owner's cursor (the owner is
  // recomputed, cheaper than storing it). Row r's slots: head[r] (slot 0) then ids[r, :] with a head.
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* head_p = has_head ? head->data_ptr<int64_t>() : nullptr;
  auto slot = [&](int64_t r, int64_t s) -> int64_t {  // for the slow paths only
    return has_head ? (s == 0 ? head_p[r] : id[r * S + s - 1]) : id[r * S + s];
  };
  // the first bad slot of row r, named (called once the row is known to hold one)
  auto fail = [&](int64_t r) {
    for (int64_t s = 0; s < M; ++s) {
      const int64_t v = slot(r, s);
      TORCH_CHECK(v >= -1, "prmkd: route_by_owner: ids[", r, ", ", s, "] = ", v,
                  ": item ids must be >= -1 (-1 = empty slot)");
      if (v == -1) continue;
      const int64_t k = int64_t(std::upper_bound(starts.begin(), starts.end(), v) - starts.begin()) - 1;
      TORCH_CHECK(k >= 0 && v < end_of[k], "prmkd: route_by_owner: ids[", r, ", ", s, "] = ", v,
                  " is on no rank's shard (the ranks' ranges cover the catalog [0, C); is the id outside it?)");
    }
    TORCH_CHECK(false, "prmkd: route_by_owner: internal error: row ", r, " flagged, no bad id found");
  };
  std::vector<int32_t> counts(W * b, 0);  // [W, b]
  std::vector<int64_t> total(W, 0);
  for (int64_t r = 0; r < b; ++r) {
    if (contiguous) {
      // per range k, the row's ids >= its start, summed in a register (no counter in memory that consecutive
      // ids increment in turn); range k holds ge[k] - ge[k + 1] of them (-1 < every start: never counted)
      const int64_t* row = id + r * S;
      const int64_t hv = has_head ? head_p[r] : -1;
      bool bad = (hv < -1) | (hv >= last_end) | ((hv >= 0) & (hv < first_start));
      for (int64_t s = 0; s < S; ++s)
        bad |= (row[s] < -1) | (row[s] >= last_end) | ((row[s] >= 0) & (row[s] < first_start));
      if (bad) fail(r);
      int64_t ge[17];
      for (int64_t k = 0; k < n_ranges; ++k) {
        const int64_t lo_k = starts[k];
        int64_t c = hv >= lo_k;
        for (int64_t s = 0; s < S; ++s) c += row[s] >= lo_k;
        ge[k] = c;
      }
      ge[n_ranges] = 0;
      for (int64_t k = 0; k < n_ranges; ++k) counts[rank_of[k] * b + r] = int32_t(ge[k] - ge[k + 1]);
      continue;
    }
    for (int64_t s = 0; s < M; ++s) {
      const int64_t v = slot(r, s);
      if (v == -1) continue;
      const int64_t k = range_of(v);
      if (v < -1 || k < 0 || v >= end_of[k]) fail(r);
      ++counts[rank_of[k] * b + r];
    }
  }
  for (int64_t q = 0; q < W; ++q)
    for (int64_t r = 0; r < b; ++r) total[q] += counts[q * b + r];
  auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor splits = at::empty({W}, i64);
  int64_t* split_p = splits.data_ptr<int64_t>();
  std::vector<int64_t> id_cursor(W), pos_cursor(W);
  int64_t send_len = 0, pos_len = 0;
  for (int64_t q = 0; q < W; ++q) {
    split_p[q] = b + total[q];
    id_cursor[q] = send_len + b;
    pos_cursor[q] = pos_len;
    send_len += b + total[q];
    pos_len += total[q];
  }
  // (from the scratch pool: several MiB a step, which fresh from malloc cost a page fault per 4 KiB each call)
  at::Tensor send = pooled_empty(send_len, at::kInt);
  at::Tensor pos = pooled_empty(pos_len, at::kLong);
  int32_t* send_p = send.data_ptr<int32_t>();
  int64_t* pos_p = pos.data_ptr<int64_t>();
  for (int64_t q = 0; q < W; ++q)  // per owner: its b row counts, then its ids
    std::copy(counts.begin() + q * b, counts.begin() + (q + 1) * b, send_p + (id_cursor[q] - b));
  // per range index (not rank): the cursors and offsets the write pass needs
  std::vector<int64_t*> pos_at(n_ranges);
  std::vector<int32_t*> id_at(n_ranges);
  std::vector<int64_t> base(n_ranges);
  for (int64_t k = 0; k < n_ranges; ++k) {
    pos_at[k] = pos_p + pos_cursor[rank_of[k]];
    id_at[k] = send_p + id_cursor[rank_of[k]];
    base[k] = lo_p[rank_of[k]];
  }
  auto emit = [&](int64_t v, int64_t flat) {
    if (v < 0) return;
    const int64_t k = range_of(v);
    *id_at[k]++ = int32_t(v - base[k]);
    *pos_at[k]++ = flat;
  };
  for (int64_t r = 0; r < b; ++r) {
    const int64_t* row = id + r * S;
    if (has_head) emit(head_p[r], r * M);
    for (int64_t s = 0, flat = r * M + (has_head ? 1 : 0); s < S; ++s, ++flat) emit(row[s], flat);
  }
  return {send, splits, pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(prmkd, CPU, m) { m.impl("route_by_owner", &route_by_owner); }

}  // namespace prmkd
