// The loader's window assembly (prmkd_dist/data/loader.py): copy the rows of one Arrow list column of a row
// group into their shuffled rows of a shuffle window, checking them in the same pass.
//
// The numpy path (check_example_table, then a scatter) reads every teacher value three to five times (range
// test, finiteness, sortedness, copy); here each value is read once, tested in registers and written once.
// The functions take the Arrow buffers as they are (list offsets, int32 or int64, absolute into the values)
// and the window's numpy arrays, release the GIL, and return one byte of problem bits per row; the caller
// names the problems (file, column, row) and decides whether to raise or to skip the rows. They are the
// fast path of prmkd_dist.data.loader; its numpy path is the reference they are tested against.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace prmkd {
namespace {

// problem bits of one row (mirrored in prmkd_dist/data/loader.py)
constexpr uint8_t kIdOutside = 1;    // an item id outside [0, num_items)
constexpr uint8_t kTooMany = 2;      // more entries than the teacher's declared K
constexpr uint8_t kNonFinite = 4;    // a NaN or infinite score
constexpr uint8_t kUnsorted = 8;     // scores not sorted descending
constexpr uint8_t kLengthDiff = 16;  // the score list's length differs from the id list's

py::buffer_info request(const py::buffer& b, const char* name, char kind, ssize_t itemsize, bool writable) {
  py::buffer_info info = b.request(writable);
  const std::string fmt = info.format;
  const char f = fmt.empty() ? '?' : fmt.back();
  const bool kind_ok = kind == 'i' ? (f == 'l' || f == 'q' || f == 'i') : (kind == 'f' ? f == 'f' : f == 'B');
  if (!kind_ok || info.itemsize != itemsize)
    throw std::invalid_argument(std::string("prmkd shard rows: ") + name + " has format '" + fmt + "' and item size " +
                                std::to_string(info.itemsize) + ", expected " + std::to_string(itemsize) + "-byte " +
                                (kind == 'i' ? "integers" : (kind == 'f' ? "float32" : "bytes")));
  ssize_t expect = info.itemsize;  // C-contiguous
  for (ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] > 1 && info.strides[d] != expect)
      throw std::invalid_argument(std::string("prmkd shard rows: ") + name + " must be C-contiguous");
    expect *= info.shape[d];
  }
  return info;
}

ssize_t numel(const py::buffer_info& b) {
  ssize_t n = 1;
  for (auto s : b.shape) n *= s;
  return n;
}

// The tests: branch-free reductions that GCC vectorises (function multi-versioning, as in kd_vec.cpp: AVX-512,
// AVX2 or baseline x86-64 picked at load time; plain loops elsewhere).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define PRMKD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PRMKD_MULTIVERSION
#endif

// an id outside [0, C): as unsigned, negative ids are >= C too
PRMKD_MULTIVERSION bool any_outside(const int64_t* v, int64_t n, uint64_t C) {
  uint64_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) bad |= static_cast<uint64_t>(v[j]) >= C;
  return bad != 0;
}

PRMKD_MULTIVERSION bool any_nonfinite(const float* v, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(v);  // exponent all ones: inf or NaN
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) bad |= (u[j] & 0x7f800000u) == 0x7f800000u;
  return bad != 0;
}

PRMKD_MULTIVERSION bool any_increase(const float* v, int64_t n) {
  uint32_t up = 0;
#pragma omp simd reduction(| : up)
  for (int64_t j = 1; j < n; ++j) up |= v[j] > v[j - 1];
  return up != 0;
}

// Offsets are int32 (Arrow list) or int64 (large list): read either as int64.
struct Offsets {
  const int32_t* o32 = nullptr;
  const int64_t* o64 = nullptr;
  ssize_t n = 0;  // entries (rows + 1)
  int64_t operator[](ssize_t i) const { return o32 ? int64_t(o32[i]) : o64[i]; }
};

Offsets offsets_of(const py::buffer& b, const char* name) {
  py::buffer_info info = b.request();
  Offsets o;
  if (info.itemsize == 4) {
    o.o32 = static_cast<const int32_t*>(request(b, name, 'i', 4, false).ptr);
  } else {
    o.o64 = static_cast<const int64_t*>(request(b, name, 'i', 8, false).ptr);
  }
  o.n = numel(info);
  return o;
}

// The rows are checked against their buffers before anything is copied: a malformed offset buffer must
// raise, not read out of bounds.
void check_offsets(const Offsets& o, ssize_t values, const char* name) {
  for (ssize_t i = 0; i < o.n; ++i) {
    if (o[i] < 0 || o[i] > values || (i && o[i] < o[i - 1]))
      throw std::invalid_argument(std::string("prmkd shard rows: ") + name + " are not rising offsets into " +
                                  std::to_string(values) + " values (entry " + std::to_string(i) + ")");
  }
}

const int64_t* dest_rows(const py::buffer& dest, ssize_t rows, ssize_t window_rows) {
  py::buffer_info d = request(dest, "dest", 'i', 8, false);
  if (numel(d) != rows)
    throw std::invalid_argument("prmkd shard rows: dest has " + std::to_string(numel(d)) + " entries for " +
                                std::to_string(rows) + " rows");
  const int64_t* p = static_cast<const int64_t*>(d.ptr);
  for (ssize_t r = 0; r < rows; ++r)
    if (p[r] < 0 || p[r] >= window_rows)
      throw std::invalid_argument("prmkd shard rows: dest row " + std::to_string(p[r]) + " outside the window of " +
                                  std::to_string(window_rows) + " rows");
  return p;
}

// One teacher's lists of a row group: offsets [m + 1] (absolute into the values) of ids and of scores.
struct TeacherLists {
  Offsets io, so;
  const int64_t* ids;
  const float* scores;
  int64_t k;
};

// Every teacher's lists of rows [0, m) (``lists``: per teacher (id offsets, ids, score offsets, scores, k),
// in window order) into window rows dest[r] of ids [S, T, Kmax] (int64) and scores [S, T, Kmax] (float32):
// slots [0, k_t) of teacher t, entries beyond a short list set to -1 / 0.0 (slots [k_t, Kmax) are the
// caller's). A window row is written whole (all teachers) while it is in cache. Returns problem bits
// [m, T] (uint8).
py::array_t<uint8_t> teacher_rows_into(py::buffer win_ids, py::buffer win_scores, py::buffer dest, py::list lists,
                                       int64_t num_items, bool check_sorted) {
  py::buffer_info wi = request(win_ids, "window ids", 'i', 8, true);
  py::buffer_info ws = request(win_scores, "window scores", 'f', 4, true);
  if (wi.ndim != 3 || ws.ndim != 3 || wi.shape != ws.shape)
    throw std::invalid_argument("prmkd shard rows: window ids/scores must both be [S, T, K]");
  const ssize_t S = wi.shape[0], T = wi.shape[1], K = wi.shape[2];
  if (static_cast<ssize_t>(lists.size()) != T)
    throw std::invalid_argument("prmkd shard rows: " + std::to_string(lists.size()) + " teachers' lists for a window of T=" +
                                std::to_string(T));
  std::vector<TeacherLists> tl;
  ssize_t m = -1;
  for (ssize_t t = 0; t < T; ++t) {
    py::tuple item = lists[t].cast<py::tuple>();
    if (item.size() != 5) throw std::invalid_argument("prmkd shard rows: a teacher's lists are (id offsets, ids, score offsets, scores, k)");
    TeacherLists x;
    x.io = offsets_of(item[0].cast<py::buffer>(), "id offsets");
    x.so = offsets_of(item[2].cast<py::buffer>(), "score offsets");
    py::buffer_info iv = request(item[1].cast<py::buffer>(), "ids", 'i', 8, false);
    py::buffer_info sv = request(item[3].cast<py::buffer>(), "scores", 'f', 4, false);
    x.k = item[4].cast<int64_t>();
    if (x.k < 0 || x.k > K)
      throw std::invalid_argument("prmkd shard rows: teacher " + std::to_string(t) + " has k=" + std::to_string(x.k) +
                                  ", the window K=" + std::to_string(K));
    if (x.io.n < 1 || x.so.n != x.io.n || (m >= 0 && x.io.n - 1 != m))
      throw std::invalid_argument("prmkd shard rows: teachers' id and score offsets differ in rows");
    m = x.io.n - 1;
    check_offsets(x.io, numel(iv), "id offsets");
    check_offsets(x.so, numel(sv), "score offsets");
    x.ids = static_cast<const int64_t*>(iv.ptr);
    x.scores = static_cast<const float*>(sv.ptr);
    tl.push_back(x);
  }
  if (m < 0) m = 0;
  const int64_t* dr = dest_rows(dest, m, S);
  py::array_t<uint8_t> flags({m, static_cast<ssize_t>(T)});
  uint8_t* fl = flags.mutable_data();
  int64_t* out_ids = static_cast<int64_t*>(wi.ptr);
  float* out_scores = static_cast<float*>(ws.ptr);
  const uint64_t C = static_cast<uint64_t>(num_items);
  {
    py::gil_scoped_release nogil;
    for (ssize_t r = 0; r < m; ++r) {
      for (ssize_t t = 0; t < T; ++t) {
        const TeacherLists& x = tl[t];
        const int64_t lo = x.io[r], len = x.io[r + 1] - lo, slo = x.so[r], slen = x.so[r + 1] - slo;
        uint8_t f = 0;
        if (slen != len) f |= kLengthDiff;
        if (len > x.k) f |= kTooMany;
        const int64_t n = std::min<int64_t>(std::min(len, slen), x.k);
        int64_t* di = out_ids + (dr[r] * T + t) * K;
        float* ds = out_scores + (dr[r] * T + t) * K;
        const int64_t* si = x.ids + lo;
        const float* ss = x.scores + slo;
        // memcpy (glibc's vectorised copy, whatever the build flags), then the tests over the source
        // entries, which the copy has just brought into L1
        std::memcpy(di, si, n * sizeof(int64_t));
        std::memcpy(ds, ss, n * sizeof(float));
        for (int64_t j = n; j < x.k; ++j) di[j] = -1;
        for (int64_t j = n; j < x.k; ++j) ds[j] = 0.0f;
        // every entry is tested, also beyond k (a too-long list, already a bad row), as the numpy path does
        const bool outside = any_outside(si, len, C);
        const bool nonfinite = any_nonfinite(ss, slen);
        const bool up = check_sorted && any_increase(ss, slen);
        fl[r * T + t] = f | (outside ? kIdOutside : 0) | (nonfinite ? kNonFinite : 0) | (up ? kUnsorted : 0);
      }
    }
  }
  return flags;
}

// Histories (offsets [m + 1] into values) into window rows dest[r] of out [S, L] (int64), right-aligned, the
// last L items kept, slots before a short history set to -1. Returns problem bits [m] (kIdOutside only).
py::array_t<uint8_t> history_rows_into(py::buffer out, py::buffer dest, py::buffer offsets, py::buffer values,
                                       int64_t num_items) {
  py::buffer_info ob = request(out, "window history", 'i', 8, true);
  if (ob.ndim != 2) throw std::invalid_argument("prmkd shard rows: window history must be [S, L]");
  const ssize_t S = ob.shape[0], L = ob.shape[1];
  Offsets o = offsets_of(offsets, "history offsets");
  py::buffer_info vb = request(values, "history values", 'i', 8, false);
  if (o.n < 1) throw std::invalid_argument("prmkd shard rows: history offsets need at least one entry");
  const ssize_t m = o.n - 1;
  check_offsets(o, numel(vb), "history offsets");
  const int64_t* dr = dest_rows(dest, m, S);
  py::array_t<uint8_t> flags(m);
  uint8_t* fl = flags.mutable_data();
  int64_t* win = static_cast<int64_t*>(ob.ptr);
  const int64_t* v = static_cast<const int64_t*>(vb.ptr);
  const uint64_t C = static_cast<uint64_t>(num_items);
  {
    py::gil_scoped_release nogil;
    for (ssize_t r = 0; r < m; ++r) {
      const int64_t lo = o[r], len = o[r + 1] - lo;
      const int64_t n = std::min<int64_t>(len, L);
      int64_t* row = win + dr[r] * L;
      for (int64_t j = 0; j < L - n; ++j) row[j] = -1;
      const int64_t* src = v + lo + (len - n);
      std::memcpy(row + (L - n), src, n * sizeof(int64_t));
      fl[r] = any_outside(v + lo, len, C) ? kIdOutside : 0;  // also the items dropped beyond L
    }
  }
  return flags;
}

}  // namespace

void bind_shard_rows(py::module_& m) {
  m.def("teacher_rows_into", &teacher_rows_into, py::arg("win_ids"), py::arg("win_scores"), py::arg("dest"),
        py::arg("lists"), py::arg("num_items"), py::arg("check_sorted"),
        "Copy every teacher's top-K lists into shuffled window rows, checking them; returns problem bits [m, T].");
  m.def("history_rows_into", &history_rows_into, py::arg("out"), py::arg("dest"), py::arg("offsets"),
        py::arg("values"), py::arg("num_items"),
        "Copy histories right-aligned into shuffled window rows, checking item ids; returns problem bits per row.");
}

}  // namespace prmkd
