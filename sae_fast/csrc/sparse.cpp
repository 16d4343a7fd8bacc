// CPU kernels for the sparse halves of the SAE ops (see sae_fast/ops.py for the math and the autograd use).
//
//   gather_combine(idx[N,k], w[N,k], M[F,d])        out[n]    = sum_j w[n,j] * M[idx[n,j]]           -> [N,d]
//   pair_dot(idx[N,k], G[N,d], M[F,d])              out[n,j]  = <G[n], M[idx[n,j]]>                  -> [N,k]
//   decode_residual(idx, w, M, b[d], X[N,d])        r = gather_combine(idx, w, M) + b - X, D = pair_dot(idx, r, M)
//                                                   in one pass (each row's k rows of M are read once), with
//                                                   sum_n ||r[n]||^2 and sum_n r[n]
//   segment_reduce(order, offsets, w[N,k], X[N,d])  out[f]    = sum over f's pairs q of w[q] * X[q/k] -> [F,d]
//                                                   sums[f]   = sum over f's pairs q of w[q]          -> [F]
//
//   reverse_index(idx[N,k], F)                      the flat pairs grouped by feature: (order[N*k], offsets[F+1])
//   topk_rows(pre[R,F], k)                          the k largest of each row, unordered -> (values, indices)
//   gather_runs(bases[S], offsets[S+1], starts[m], lengths[m], out, row_bytes)
//                                                   out = rows [starts[i], starts[i] + lengths[i]) of the S
//                                                   memory-mapped shards, runs by start (streaming stores), GIL off
//
// gather_combine and pair_dot are parallel over rows, segment_reduce over features (its pairs come pre-grouped
// by a reverse index, so every output row has one writer: no atomics, deterministic). Accumulation is in the
// op-math type (float for half/bfloat16). at::parallel_for runs on torch's OpenMP pool (torch.set_num_threads).
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <functional>
#include <type_traits>
#include <limits>
#include <utility>
#include <vector>

namespace {

// sae_fast.ops validates every input once before dispatch; these checks keep the kernels memory-safe when called
// directly (one serial pass over the [N, k] indices: a few microseconds next to the O(N k d) work).
void check_index(const at::Tensor& idx, int64_t F) {
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "indices must be a contiguous [N, k] int64 tensor");
  const int64_t* ip = idx.data_ptr<int64_t>();
  int64_t lo = 0, hi = 0;
  for (int64_t p = 0; p < idx.numel(); ++p) {
    lo = std::min(lo, ip[p]);
    hi = std::max(hi, ip[p]);
  }
  TORCH_CHECK(lo >= 0 && (idx.numel() == 0 || hi < F), "feature index out of range [0, ", F, "): found ",
              lo < 0 ? lo : hi);
}

// A dot product the compiler may vectorise (the simd reduction allows reassociating the sum).
template <typename acc_t, typename T>
acc_t dot(const T* a, const T* b, int64_t d) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) s += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return s;
}

// y += a x (vectorised: x and y never overlap here).
template <typename acc_t, typename T>
inline void axpy(acc_t a, const T* __restrict x, acc_t* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) y[c] += a * static_cast<acc_t>(x[c]);
}

// sum_c v[c]^2, and col[c] += v[c], in double (a pragma cannot sit inside the AT_DISPATCH macro's argument).
template <typename T>
double square_and_add(const T* v, double* __restrict col, int64_t d) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) {
    const double x = static_cast<double>(v[c]);
    s += x * x;
    col[c] += x;
  }
  return s;
}

// Prefetch the cache lines of one row of M (d values) towards L1: the sparse kernels read rows at random.
template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

// How many rows ahead the gathering loops prefetch (a row of d = 640 fp32 is 40 cache lines).
constexpr int64_t kAhead = 2;

// acc += sum_j w[j] M[idx[j]] over one row's k pairs (zero weights skipped), prefetching kAhead rows ahead; the
// last kAhead prefetches go to the next row's pairs `next`.
template <typename acc_t, typename T>
void combine_row(const int64_t* idx, const T* w, int64_t k, const T* M, int64_t d, const int64_t* next,
                 acc_t* acc) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t ahead = j + kAhead;
    prefetch_row(M + (ahead < k ? idx[ahead] : next[std::min(ahead - k, k - 1)]) * d, d);
    const acc_t a = static_cast<acc_t>(w[j]);
    if (a == acc_t(0)) continue;
    axpy(a, M + idx[j] * d, acc, d);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// decode_residual's row n for fp32, columns [c0, c0 + 8 NV): the residual's NV vectors stay in registers while the
// k decoder rows are combined into them, then the k dot products of the block read the same k slices again from
// L1 (k x 32 NV bytes: 16 KB at k = 32, NV = 16). With first, the k rows are prefetched whole, kAhead ahead, and
// the next row's first rows after them.
template <int NV>
void decode_block_avx2(const int64_t* idx, const float* w, int64_t k, const float* M, int64_t d, const float* b,
                       const float* x, int64_t c0, bool first, const int64_t* next, float* rn, float* Dn) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_sub_ps(_mm256_loadu_ps(b + c0 + 8 * v), _mm256_loadu_ps(x + c0 + 8 * v));
  for (int64_t j = 0; j < k; ++j) {
    if (first) {
      const int64_t ahead = j + kAhead;
      prefetch_row(M + (ahead < k ? idx[ahead] : next[std::min(ahead - k, k - 1)]) * d, d);
    }
    if (w[j] == 0.0f) continue;
    const __m256 a = _mm256_set1_ps(w[j]);
    const float* row = M + idx[j] * d + c0;
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(a, _mm256_loadu_ps(row + 8 * v), acc[v]);
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(rn + c0 + 8 * v, acc[v]);
  for (int64_t j = 0; j < k; ++j) {
    const float* row = M + idx[j] * d + c0;
    __m256 s0 = _mm256_mul_ps(acc[0], _mm256_loadu_ps(row));
    __m256 s1 = NV > 1 ? _mm256_mul_ps(acc[1], _mm256_loadu_ps(row + 8)) : _mm256_setzero_ps();
    for (int v = 2; v + 1 < NV; v += 2) {
      s0 = _mm256_fmadd_ps(acc[v], _mm256_loadu_ps(row + 8 * v), s0);
      s1 = _mm256_fmadd_ps(acc[v + 1], _mm256_loadu_ps(row + 8 * v + 8), s1);
    }
    if (NV > 2 && NV % 2) s0 = _mm256_fmadd_ps(acc[NV - 1], _mm256_loadu_ps(row + 8 * (NV - 1)), s0);
    Dn[j] += hsum(_mm256_add_ps(s0, s1));
  }
}

// decode_residual's row n for fp32 with AVX2: blocks of 128 columns, then one of 64/32/.../8, then a scalar tail.
void decode_row_avx2(const int64_t* idx, const float* w, int64_t k, const float* M, int64_t d, const float* b,
                     const float* x, const int64_t* next, float* rn, float* Dn) {
  for (int64_t j = 0; j < k; ++j) Dn[j] = 0.0f;
  int64_t c0 = 0;
  for (; c0 + 128 <= d; c0 += 128) decode_block_avx2<16>(idx, w, k, M, d, b, x, c0, c0 == 0, next, rn, Dn);
  for (; c0 + 64 <= d; c0 += 64) decode_block_avx2<8>(idx, w, k, M, d, b, x, c0, c0 == 0, next, rn, Dn);
  for (; c0 + 32 <= d; c0 += 32) decode_block_avx2<4>(idx, w, k, M, d, b, x, c0, c0 == 0, next, rn, Dn);
  for (; c0 + 8 <= d; c0 += 8) decode_block_avx2<1>(idx, w, k, M, d, b, x, c0, c0 == 0, next, rn, Dn);
  for (int64_t c = c0; c < d; ++c) {
    float r = b[c] - x[c];
    for (int64_t j = 0; j < k; ++j) r += w[j] * M[idx[j] * d + c];
    rn[c] = r;
    for (int64_t j = 0; j < k; ++j) Dn[j] += r * M[idx[j] * d + c];
  }
}
#endif

}  // namespace

at::Tensor gather_combine(const at::Tensor& idx, const at::Tensor& w, const at::Tensor& M) {
  TORCH_CHECK(M.dim() == 2 && M.scalar_type() == w.scalar_type() && M.is_contiguous() && w.is_contiguous(),
              "M must be a contiguous [F, d] tensor with the dtype of w");
  TORCH_CHECK(idx.sizes() == w.sizes(), "indices and weights must both be [N, k]");
  check_index(idx, M.size(0));
  const int64_t N = idx.size(0), k = idx.size(1), d = M.size(1);
  auto out = at::empty({N, d}, M.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, M.scalar_type(), "gather_combine", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* mp = M.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        combine_row<acc_t>(ip + n * k, wp + n * k, k, mp, d, ip + std::min(n + 1, end - 1) * k, acc.data());
        for (int64_t c = 0; c < d; ++c) op[n * d + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

std::vector<at::Tensor> decode_residual(const at::Tensor& idx, const at::Tensor& w, const at::Tensor& M,
                                        const at::Tensor& b, const at::Tensor& X) {
  // r[n] = sum_j w[n,j] M[idx[n,j]] + b - X[n];  D[n,j] = <r[n], M[idx[n,j]]> (the k rows are still in cache);
  // also, while each r[n] is in L1, sq = sum_n ||r[n]||^2 (a 0-dim double) and colsum = sum_n r[n] ([d], M's
  // dtype): the MSE and the b gradient need no further pass over r. The sums go through per-block partials of
  // kBlock rows in double, added in block order: the same bits for any thread count.
  TORCH_CHECK(M.dim() == 2 && M.scalar_type() == w.scalar_type() && M.is_contiguous() && w.is_contiguous(),
              "M must be a contiguous [F, d] tensor with the dtype of w");
  TORCH_CHECK(idx.sizes() == w.sizes(), "indices and weights must both be [N, k]");
  TORCH_CHECK(X.dim() == 2 && X.size(0) == idx.size(0) && X.size(1) == M.size(1) && X.is_contiguous() &&
                  X.scalar_type() == M.scalar_type() && b.dim() == 1 && b.size(0) == M.size(1) &&
                  b.is_contiguous() && b.scalar_type() == M.scalar_type(),
              "X must be a contiguous [N, d] and b a [d] tensor of M's dtype");
  check_index(idx, M.size(0));
  const int64_t N = idx.size(0), k = idx.size(1), d = M.size(1);
  constexpr int64_t kBlock = 64;
  const int64_t nblk = (N + kBlock - 1) / kBlock;
  auto r = at::empty({N, d}, M.options());
  auto D = at::empty({N, k}, M.options());
  auto colsum = at::empty({d}, M.options());
  auto sq = at::empty({}, M.options().dtype(at::kDouble));
  std::vector<double> part_col(nblk * d), part_sq(nblk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, M.scalar_type(), "decode_residual", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* mp = M.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* xp = X.data_ptr<scalar_t>();
    scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* Dp = D.data_ptr<scalar_t>();
    at::parallel_for(0, nblk, 1, [&](int64_t bbegin, int64_t bend) {
      std::vector<acc_t> acc(d);
      const int64_t end = std::min(bend * kBlock, N);
      for (int64_t blk = bbegin; blk < bend; ++blk) {
        double* col = part_col.data() + blk * d;
        std::fill(col, col + d, 0.0);
        double rowsq = 0;
        for (int64_t n = blk * kBlock; n < std::min((blk + 1) * kBlock, N); ++n) {
          const scalar_t* x = xp + n * d;
          scalar_t* rn = rp + n * d;
          const int64_t* next = ip + std::min(n + 1, end - 1) * k;
#if defined(__AVX2__) && defined(__FMA__)
          if constexpr (std::is_same_v<scalar_t, float>) {
            decode_row_avx2(ip + n * k, reinterpret_cast<const float*>(wp) + n * k, k,
                            reinterpret_cast<const float*>(mp), d, reinterpret_cast<const float*>(bp),
                            reinterpret_cast<const float*>(x), next, reinterpret_cast<float*>(rn),
                            reinterpret_cast<float*>(Dp) + n * k);
            rowsq += square_and_add(rn, col, d);
            continue;
          }
#endif
          for (int64_t c = 0; c < d; ++c) acc[c] = static_cast<acc_t>(bp[c]) - static_cast<acc_t>(x[c]);
          combine_row<acc_t>(ip + n * k, wp + n * k, k, mp, d, next, acc.data());
          for (int64_t c = 0; c < d; ++c) rn[c] = static_cast<scalar_t>(acc[c]);
          rowsq += square_and_add(rn, col, d);
          for (int64_t j = 0; j < k; ++j) Dp[n * k + j] = static_cast<scalar_t>(dot<acc_t>(rn, mp + ip[n * k + j] * d, d));
        }
        part_sq[blk] = rowsq;
      }
    });
    double total = 0;
    std::vector<double> col(d, 0.0);
    for (int64_t blk = 0; blk < nblk; ++blk) {
      total += part_sq[blk];
      for (int64_t c = 0; c < d; ++c) col[c] += part_col[blk * d + c];
    }
    sq.fill_(total);
    scalar_t* cp = colsum.data_ptr<scalar_t>();
    for (int64_t c = 0; c < d; ++c) cp[c] = static_cast<scalar_t>(col[c]);
  });
  return {r, D, sq, colsum};
}

at::Tensor pair_dot(const at::Tensor& idx, const at::Tensor& G, const at::Tensor& M) {
  TORCH_CHECK(G.dim() == 2 && M.dim() == 2 && G.size(1) == M.size(1) && G.size(0) == idx.size(0) &&
                  G.scalar_type() == M.scalar_type() && G.is_contiguous() && M.is_contiguous(),
              "G must be [N, d] and M [F, d], contiguous, of one dtype");
  check_index(idx, M.size(0));
  const int64_t N = idx.size(0), k = idx.size(1), d = M.size(1);
  auto out = at::empty({N, k}, M.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, M.scalar_type(), "pair_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* gp = G.data_ptr<scalar_t>();
    const scalar_t* mp = M.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* g = gp + n * d;
        for (int64_t j = 0; j < k; ++j) {
          prefetch_row(mp + ip[std::min(n * k + j + kAhead, N * k - 1)] * d, d);
          const scalar_t* row = mp + ip[n * k + j] * d;
          op[n * k + j] = static_cast<scalar_t>(dot<acc_t>(g, row, d));
        }
      }
    });
  });
  return out;
}

std::vector<at::Tensor> segment_reduce(const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& w,
                                       const at::Tensor& X, bool with_sum) {
  TORCH_CHECK(order.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong, "reverse index must be int64");
  TORCH_CHECK(w.dim() == 2 && X.dim() == 2 && w.size(0) == X.size(0) && w.scalar_type() == X.scalar_type(),
              "w must be [N, k] and X [N, d] of one dtype");
  TORCH_CHECK(order.numel() == w.numel(), "reverse index does not match the [N, k] weights");
  const int64_t F = offsets.numel() - 1, k = w.size(1), d = X.size(1), P = order.numel();
  auto out = at::empty({F, d}, X.options());
  auto sums = at::empty({with_sum ? F : 0}, X.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "segment_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* qp = order.data_ptr<int64_t>();
    const int64_t* offp = offsets.data_ptr<int64_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* xp = X.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* sp = with_sum ? sums.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, F, 4, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t f = begin; f < end; ++f) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t total = 0;
        for (int64_t p = offp[f]; p < offp[f + 1]; ++p) {
          const int64_t q = qp[p];
          prefetch_row(xp + (qp[std::min(p + kAhead, P - 1)] / k) * d, d);
          const acc_t a = static_cast<acc_t>(wp[q]);
          total += a;
          if (a == acc_t(0)) continue;
          axpy(a, xp + (q / k) * d, acc.data(), d);
        }
        for (int64_t c = 0; c < d; ++c) op[f * d + c] = static_cast<scalar_t>(acc[c]);
        if (sp) sp[f] = static_cast<scalar_t>(total);
      }
    });
  });
  return {out, sums};
}

std::vector<at::Tensor> reverse_index(const at::Tensor& idx, int64_t F) {
  // A stable counting sort of the flat pairs by feature: O(N*k + F), serial (it is a few ms at most).
  TORCH_CHECK(idx.scalar_type() == at::kLong, "indices must be int64");
  auto flat = idx.contiguous().view({-1});
  const int64_t P = flat.numel();
  auto order = at::empty({P}, flat.options());
  auto offsets = at::zeros({F + 1}, flat.options());
  const int64_t* fp = flat.data_ptr<int64_t>();
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* cp = offsets.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(fp[p] >= 0 && fp[p] < F, "feature index ", fp[p], " out of range [0, ", F, ")");
    ++cp[fp[p] + 1];
  }
  for (int64_t f = 0; f < F; ++f) cp[f + 1] += cp[f];
  std::vector<int64_t> next(cp, cp + F);
  for (int64_t p = 0; p < P; ++p) op[next[fp[p]]++] = p;
  return {order, offsets};
}

namespace {

// A row holding NaN selects NaN values at features 0..k-1 (the torch backend's result for an all-NaN row).
template <typename scalar_t>
inline void nan_row(scalar_t* vout, int64_t* iout, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    vout[j] = std::numeric_limits<scalar_t>::quiet_NaN();
    iout[j] = j;
  }
}

// The k largest of one row (see topk_rows). Pass 1 (vectorised; the row is then in L1): the max of every block of
// kLanes values, and whether the row holds NaN. The k-th largest block max lo0 is a lower bound on the row's k-th
// largest value, so pass 2 visits only the blocks whose max reaches lo0 (typically little more than k) and
// collects their values >= lo0; one nth_element over those candidates (ties: the smaller index) picks the k.
template <typename scalar_t>
void topk_row(const scalar_t* row, int64_t F, int64_t k, scalar_t* vout, int64_t* iout,
              std::vector<scalar_t>& bmax, std::vector<scalar_t>& tmp, std::vector<int64_t>& cand) {
  constexpr int64_t kLanes = 32;  // 16 and 8 give more blocks to rank, 64 no gain (d=640, F=5120, k=32)
  const int64_t nb = F / kLanes;
  int nan = 0;  // NaN compares false: it would never be a candidate (and fewer than k could be found)
  for (int64_t b = 0; b < nb; ++b) {
    const scalar_t* p = row + b * kLanes;
    scalar_t m = p[0];
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < kLanes; ++i) {
      m = p[i] > m ? p[i] : m;
      nan |= p[i] != p[i];
    }
    bmax[b] = m;
  }
  for (int64_t f = nb * kLanes; f < F; ++f) nan |= row[f] != row[f];
  if (nan) {
    nan_row(vout, iout, k);
    return;
  }
  scalar_t lo0 = -std::numeric_limits<scalar_t>::infinity();
  if (nb >= k) {
    std::copy(bmax.begin(), bmax.begin() + nb, tmp.begin());
    std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.begin() + nb, std::greater<scalar_t>());
    lo0 = tmp[k - 1];
  }
  cand.clear();
  for (int64_t b = 0; b < nb; ++b) {
    if (bmax[b] < lo0) continue;
    for (int64_t f = b * kLanes; f < (b + 1) * kLanes; ++f)
      if (row[f] >= lo0) cand.push_back(f);
  }
  for (int64_t f = nb * kLanes; f < F; ++f) cand.push_back(f);
  auto larger = [row](int64_t a, int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); };
  if (static_cast<int64_t>(cand.size()) > k) std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), larger);
  for (int64_t j = 0; j < k; ++j) {
    iout[j] = cand[j];
    vout[j] = row[cand[j]];
  }
}

#if defined(__AVX2__)
// The k largest of one fp32 row with AVX2 (same contract as topk_row). Pass 1 takes the max of each group
// (segment s, lane l): the first S * V of the row's 8-wide vectors are cut into S segments of V vectors, and the
// elementwise max of a segment's vectors gives its 8 group maxima with no horizontal reduction (S = ceil(5k / 8)
// rounded up to a multiple of 4, so ~5k groups; four segments are walked side by side, four independent max
// chains, and NaN is caught by unordered compares of pairs). The k-th largest group max lo0 bounds the row's k-th
// largest value from below, so pass 2 compares the row with lo0, four vectors at a time (one mask per 32 values;
// the row is in L1 by then, and the next row is prefetched meanwhile), and collects the few candidates >= lo0
// (~36 at F = 5120, k = 32); one nth_element over them picks the k (ties: the smaller index).
void topk_row_avx2(const float* row, int64_t F, int64_t k, const float* next, float* vout, int64_t* iout,
                   std::vector<float>& gmax, std::vector<int64_t>& cand) {
  constexpr int64_t L = 8;
  const int64_t nv = F / L;
  const int64_t S = ((5 * k + L - 1) / L + 3) / 4 * 4;
  const int64_t V = nv / S;  // 0: too few values for groups; every value is then a candidate
  const int64_t grouped = V > 0 ? S * V * L : 0;
  __m256 nan0 = _mm256_setzero_ps(), nan1 = _mm256_setzero_ps();
  for (int64_t s = 0; V > 0 && s < S; s += 4) {
    const float* p = row + s * V * L;
    __m256 m0 = _mm256_loadu_ps(p), m1 = _mm256_loadu_ps(p + V * L);
    __m256 m2 = _mm256_loadu_ps(p + 2 * V * L), m3 = _mm256_loadu_ps(p + 3 * V * L);
    nan0 = _mm256_cmp_ps(m0, m1, _CMP_UNORD_Q);
    nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps(m2, m3, _CMP_UNORD_Q));
    for (int64_t v = 1; v < V; ++v) {
      const __m256 a0 = _mm256_loadu_ps(p + v * L), a1 = _mm256_loadu_ps(p + (V + v) * L);
      const __m256 a2 = _mm256_loadu_ps(p + (2 * V + v) * L), a3 = _mm256_loadu_ps(p + (3 * V + v) * L);
      m0 = _mm256_max_ps(m0, a0);
      m1 = _mm256_max_ps(m1, a1);
      m2 = _mm256_max_ps(m2, a2);
      m3 = _mm256_max_ps(m3, a3);
      nan0 = _mm256_or_ps(nan0, _mm256_cmp_ps(a0, a1, _CMP_UNORD_Q));
      nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps(a2, a3, _CMP_UNORD_Q));
    }
    nan1 = _mm256_or_ps(nan1, nan0);
    float* g = gmax.data() + s * L;
    _mm256_storeu_ps(g, m0);
    _mm256_storeu_ps(g + L, m1);
    _mm256_storeu_ps(g + 2 * L, m2);
    _mm256_storeu_ps(g + 3 * L, m3);
  }
  bool any_nan = _mm256_movemask_ps(nan1) != 0;
  for (int64_t f = grouped; f < F; ++f) any_nan |= row[f] != row[f];
  if (any_nan) {
    nan_row(vout, iout, k);
    return;
  }
  float lo0 = -std::numeric_limits<float>::infinity();
  if (V > 0) {
    std::nth_element(gmax.begin(), gmax.begin() + (k - 1), gmax.begin() + S * L, std::greater<float>());
    lo0 = gmax[k - 1];
  }
  cand.clear();
  const __m256 lo = _mm256_set1_ps(lo0);
  auto collect = [&](int64_t v) {
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + v * L), lo, _CMP_GE_OQ)));
    while (m) {
      cand.push_back(v * L + __builtin_ctz(m));
      m &= m - 1;
    }
  };
  const int64_t nq = nv / 4;
  for (int64_t q = 0; q < nq; ++q) {
    if (next) __builtin_prefetch(next + q * 4 * L), __builtin_prefetch(next + q * 4 * L + 16);
    const float* p = row + q * 4 * L;
    const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + L)),
                                    _mm256_max_ps(_mm256_loadu_ps(p + 2 * L), _mm256_loadu_ps(p + 3 * L)));
    if (_mm256_movemask_ps(_mm256_cmp_ps(mx, lo, _CMP_GE_OQ)))
      for (int64_t v = 4 * q; v < 4 * q + 4; ++v) collect(v);
  }
  for (int64_t v = 4 * nq; v < nv; ++v) collect(v);
  for (int64_t f = nv * L; f < F; ++f)
    if (row[f] >= lo0) cand.push_back(f);
  auto larger = [row](int64_t a, int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); };
  if (static_cast<int64_t>(cand.size()) > k) std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), larger);
  for (int64_t j = 0; j < k; ++j) {
    iout[j] = cand[j];
    vout[j] = row[cand[j]];
  }
}
#endif

}  // namespace

std::vector<at::Tensor> topk_rows(const at::Tensor& pre, int64_t k) {
  // The k largest of each row, unordered (topk_row above). Meant for small k (the caller uses torch.topk for large
  // k). A row holding NaN has no top-k: its k values are NaN (indices 0..k-1), which sae_fast.ops reports as an
  // error naming the row.
  TORCH_CHECK(pre.dim() == 2 && pre.is_contiguous() && k >= 1 && k <= pre.size(1), "need [R, F] rows, 1 <= k <= F");
  const int64_t R = pre.size(0), F = pre.size(1);
  auto values = at::empty({R, k}, pre.options());
  auto indices = at::empty({R, k}, pre.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "topk_rows", [&] {
    const scalar_t* pp = pre.data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
#if defined(__AVX2__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> gmax(F + 32);
        std::vector<int64_t> cand;
        cand.reserve(F);
        for (int64_t r = begin; r < end; ++r)
          topk_row_avx2(reinterpret_cast<const float*>(pp) + r * F, F, k,
                        r + 1 < end ? reinterpret_cast<const float*>(pp) + (r + 1) * F : nullptr,
                        reinterpret_cast<float*>(vp) + r * k, ip + r * k, gmax, cand);
      });
      return;
    }
#endif
    at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> bmax(F), tmp(F);
      std::vector<int64_t> cand;
      cand.reserve(F);
      for (int64_t r = begin; r < end; ++r) topk_row<scalar_t>(pp + r * F, F, k, vp + r * k, ip + r * k, bmax, tmp, cand);
    });
  });
  return {values, indices};
}

// A copy whose stores bypass the caches (AVX2 streaming stores) for runs of >= 1 KB: the batch is read once,
// later, by the trainer, so caching it only evicts the shards' lines and makes every store line a read-for-
// ownership first. Only whole 64-byte lines are streamed (a partly streamed line is written back by a slow
// read-modify-write); the ends of a run go through memcpy. On the 2 GB loader bench (Zen 3 EPYC) this took the
// 2-thread gather from 0.244 s to 0.186 s.
inline void copy_streaming(char* dst, const char* src, size_t n) {
#if defined(__AVX2__)
  if (n >= 1024) {
    const size_t head = (64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64;
    std::memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    for (; n >= 128; dst += 128, src += 128, n -= 128) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64));
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 96));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), a);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 32), b);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 64), c);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 96), d);
    }
    if (n >= 64) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 32),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32)));
      dst += 64, src += 64, n -= 64;
    }
  }
#endif
  std::memcpy(dst, src, n);
}

// A 1-D int64 buffer (a numpy array: no torch tensors, whose conversion cost more than a small gather).
const int64_t* int64_buffer(const py::buffer_info& b, const char* name) {
  TORCH_CHECK(b.ndim == 1 && b.itemsize == 8 && (b.format == "l" || b.format == "q") &&
                  (b.shape[0] < 2 || b.strides[0] == 8),
              "gather_runs: ", name, " must be a contiguous 1-D int64 array");
  return static_cast<const int64_t*>(b.ptr);
}

// The shuffling loader's batch gather (sae_fast.activations.loader): runs [starts[i], starts[i] + lengths[i]) of
// global token ids over S shards whose bytes start at bases[s] (the shards' memory maps, kept alive by the
// caller) and hold tokens [offsets[s], offsets[s+1]); out (any C-contiguous writable buffer) receives the runs'
// rows in order of their starts (ties: in the given order), so that the reads walk forward through the files.
// Touching runs are merged and a run crossing a shard's end is split: each copy is one stretch of one file. The
// sort and the copies run with the GIL released, so that the loader's threads gather in parallel. (Prefetching
// 4-32 runs ahead was tried on the bench's 2 GB set and changed nothing: the hardware prefetcher streams each run.)
void gather_runs(const py::buffer& bases, const py::buffer& offsets, const py::buffer& starts,
                 const py::buffer& lengths, const py::buffer& out, int64_t row_bytes) {
  const py::buffer_info bb = bases.request(), ob = offsets.request(), sb = starts.request(), lb = lengths.request();
  const py::buffer_info outb = out.request(true);
  const int64_t* base = int64_buffer(bb, "bases");
  const int64_t* off = int64_buffer(ob, "offsets");
  const int64_t* st = int64_buffer(sb, "starts");
  const int64_t* len = int64_buffer(lb, "lengths");
  const int64_t S = bb.shape[0], m = sb.shape[0];
  TORCH_CHECK(ob.shape[0] == S + 1 && lb.shape[0] == m && row_bytes > 0,
              "gather_runs: offsets must have one more entry than bases, and lengths one per start");
  int64_t contiguous = outb.itemsize;
  for (int64_t a = outb.ndim - 1; a >= 0; contiguous *= outb.shape[a--])
    TORCH_CHECK(outb.shape[a] < 2 || outb.strides[a] == contiguous, "gather_runs: out must be C-contiguous");
  std::vector<std::pair<int64_t, int64_t>> order(m);  // (start, position): sorting it is stable in the starts
  int64_t rows = 0;
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(len[i] >= 0 && st[i] >= 0 && st[i] + len[i] <= off[S], "gather_runs: run (", st[i], ", ", len[i],
                ") at ", i, " is outside the shards' rows [0, ", off[S], ")");
    order[i] = {st[i], i};
    rows += len[i];
  }
  TORCH_CHECK(outb.size * outb.itemsize == rows * row_bytes, "gather_runs: out must hold ", rows, " rows x ",
              row_bytes, " bytes");
  char* o = static_cast<char*>(outb.ptr);
  py::gil_scoped_release unlocked;
  std::sort(order.begin(), order.end());
  int64_t s = 0;
  for (int64_t i = 0; i < m;) {
    int64_t lo = order[i].first, hi = lo + len[order[i].second];
    for (++i; i < m && order[i].first == hi; ++i) hi += len[order[i].second];  // touching runs: one copy
    while (lo < hi) {
      while (lo < off[s]) --s;  // a run overlapping the previous one may start in an earlier shard
      while (lo >= off[s + 1]) ++s;
      const int64_t stop = std::min(hi, off[s + 1]);
      copy_streaming(o, reinterpret_cast<const char*>(base[s]) + (lo - off[s]) * row_bytes, (stop - lo) * row_bytes);
      o += (stop - lo) * row_bytes;
      lo = stop;
    }
  }
#if defined(__AVX2__)
  _mm_sfence();  // streaming stores are weakly ordered: make them visible before the batch is handed over
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sae-fast CPU kernels: sparse gather-combine, pair dot products, reverse-index segmented reduction";
  m.def("gather_combine", &gather_combine, "out[n] = sum_j w[n,j] M[idx[n,j]]");
  m.def("decode_residual", &decode_residual,
        "(r, D, sq, colsum): r[n] = sum_j w[n,j] M[idx[n,j]] + b - X[n], D[n,j] = <r[n], M[idx[n,j]]>, "
        "sq = sum_n ||r[n]||^2 (double), colsum = sum_n r[n]");
  m.def("pair_dot", &pair_dot, "out[n,j] = <G[n], M[idx[n,j]]>");
  m.def("reverse_index", &reverse_index, "pairs grouped by feature: (order, offsets)");
  m.def("topk_rows", &topk_rows, "the k largest of each row, unordered: (values, indices)");
  m.def("segment_reduce", &segment_reduce, "out[f] = sum over f's pairs of w * X[row] (+ sums of w)");
  m.def("gather_runs", &gather_runs, "out = the rows of runs (start, length) of the shards at bases, by start");
}
