// Paged decode attention for CPUs: one query token per sequence against its context, read where it lies in the
// paged KV cache (no gather into a contiguous buffer, no per-sequence dispatch). Registered as
// torch.ops.crescent_cpu.paged_decode; built and loaded by crescent.kernels.cpu (see __init__.py).
//
// Shapes: q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, W] int32;
// context_lens [B] int32 (>= 1). Returns [B, H, D] in q's dtype. Math in fp32 (fp64 for fp64 inputs).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Calls fn(t, row_ptr) for each of a sequence's first len tokens, in order: token t's row (all KV heads) in cache,
// found through the sequence's block table (a block is a contiguous run of block_size rows).
template <typename scalar_t, typename F>
inline void for_each_row(const scalar_t* cache, const int32_t* table, int64_t len, int64_t block_size, int64_t row,
                         const F& fn) {
  for (int64_t t0 = 0; t0 < len; t0 += block_size) {
    const int64_t n = std::min(block_size, len - t0);
    const scalar_t* base = cache + static_cast<int64_t>(table[t0 / block_size]) * block_size * row;
    for (int64_t i = 0; i < n; ++i) fn(t0 + i, base + i * row);
  }
}

template <typename scalar_t>
void decode_tasks(const scalar_t* q, const scalar_t* kc, const scalar_t* vc, const int32_t* tables,
                  const int32_t* lens, scalar_t* out, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                  int64_t block_size, int64_t width, double scale) {
  using acc_t = at::opmath_type<scalar_t>;  // float for float/bf16/half, double for double
  const int64_t group = heads / kv_heads;
  const int64_t row = kv_heads * dim;  // one token's K (or V) for all KV heads, contiguous in the cache
  // One task per sequence: each token's K and V rows are read once, whole and in order, for all of the
  // sequence's query heads.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(heads * dim), acc(heads * dim), scores, inv(heads);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      const int32_t* table = tables + b * width;
      scores.resize(heads * len);
      for (int64_t i = 0; i < heads * dim; ++i) qf[i] = static_cast<acc_t>(q[b * heads * dim + i]) * static_cast<acc_t>(scale);
      for_each_row(kc, table, len, block_size, row, [&](int64_t t, const scalar_t* kr) {
        for (int64_t h = 0; h < heads; ++h) {
          const acc_t* qh = qf.data() + h * dim;
          const scalar_t* kp = kr + (h / group) * dim;
          acc_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qh[d] * static_cast<acc_t>(kp[d]);
          scores[h * len + t] = s;
        }
      });
      for (int64_t h = 0; h < heads; ++h) {
        acc_t* sh = scores.data() + h * len;
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sh[t]);
        acc_t sum = 0;
        for (int64_t t = 0; t < len; ++t) {
          sh[t] = std::exp(sh[t] - m);
          sum += sh[t];
        }
        inv[h] = acc_t(1) / sum;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for_each_row(vc, table, len, block_size, row, [&](int64_t t, const scalar_t* vr) {
        for (int64_t h = 0; h < heads; ++h) {
          const acc_t p = scores[h * len + t];
          const scalar_t* vp = vr + (h / group) * dim;
          acc_t* ah = acc.data() + h * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ah[d] += p * static_cast<acc_t>(vp[d]);
        }
      });
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < dim; ++d)
          out[(b * heads + h) * dim + d] = static_cast<scalar_t>(acc[h * dim + d] * inv[h]);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "paged_decode: q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode: k_cache and v_cache must be [num_blocks, block_size, Hkv, D] and equal, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_decode: q and the caches must share a dtype");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(2), block_size = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == dim, "paged_decode: head dim of q (", dim, ") and cache (", k_cache.size(3),
              ") differ");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "paged_decode: ", heads, " query heads do not group over ",
              kv_heads, " KV heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch &&
                  block_tables.scalar_type() == at::kInt,
              "paged_decode: block_tables must be int32 [B, W]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == batch && context_lens.scalar_type() == at::kInt,
              "paged_decode: context_lens must be int32 [B]");
  // The caches are read in place: a copy of a non-contiguous cache would cost more than the attention itself.
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the caches must be contiguous");
  auto qc = q.contiguous();
  const auto& kcc = k_cache;
  const auto& vcc = v_cache;
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t width = tables.size(1), num_blocks = kcc.size(0);
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * block_size, "paged_decode: context length ", lp[b],
                " of sequence ", b, " is outside [1, ", width * block_size, "]");
    for (int64_t j = 0; j < (lp[b] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(tp[b * width + j] >= 0 && tp[b * width + j] < num_blocks, "paged_decode: block id ",
                  tp[b * width + j], " is outside the cache's ", num_blocks, " blocks");
  }
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode", [&] {
    decode_tasks<scalar_t>(qc.data_ptr<scalar_t>(), kcc.data_ptr<scalar_t>(), vcc.data_ptr<scalar_t>(), tp, lp,
                           out.data_ptr<scalar_t>(), batch, heads, kv_heads, dim, block_size, width,
                           scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(crescent_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(crescent_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
