// Attention over a paged int8 KV cache on the CPU: query rows, each with its own block table row and context (a
// decode's token, or each token of a prefill with its causal context), the whole batch in one call, the work split
// into (row, kv head, 512-token partition) tasks run by ATen's thread pool and merged with the online-softmax rule. The int8 codes are read straight from the pages, never dequantized into a copy; the
// cache's scales fold into the query and the output (qpass/runtime/paged_attention.py derives the folding).
//
// The key cache may be token-major (a key's channels contiguous: qpass's own caches) or channel-major (a block's
// slots contiguous for each channel: the pages of qpass's vLLM backend, qpass/vllm/int8_layer.py). Channel-major keys
// score 16 slots at once with plain vector multiply-adds; token-major ones need a horizontal sum per key and row,
// which costs several times more. Values are token-major: the output accumulates whole rows.
//
// Built on first use by qpass/runtime/cpu_kernel.py (torch.utils.cpp_extension), with -O3 -march=native; the
// partition size, not the thread count, decides how the sums are grouped, so results do not depend on the threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

// glibc's vector expf (libmvec), so that the softmax's exponentials vectorize without -ffast-math.
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));

namespace {

constexpr int64_t kPartition = 512;  // keys per task; fixed so the summation order is the same on any machine

struct Cache {
  const int8_t* data;
  int64_t block, slot, head, channel;  // strides in elements; the slot or the channel stride is 1
};

struct Pairs {  // the dynamic cache's (scale, offset) per token and kv head, float32
  const float* data;
  int64_t block, slot, head;
};

struct Task {
  const float* q;       // [group, D] the group's query rows, softmax scale (and static K scale) folded in
  const float* q_sums;  // [group] each row's sum (dynamic K offsets)
  const int32_t* table;
  int64_t kv_head, begin, end, block_size;
};

// Calls visit(j, code, pair) for keys begin .. end - 1 of the task (j counted from begin): the int8 codes of the key
// and kv head, and the dynamic pair (scale, offset) or nullptr; block by block, so that no key costs a division.
template <typename Visit>
void for_each_key(const Task& t, const Cache& c, const Pairs* p, Visit&& visit) {
  for (int64_t pos = t.begin; pos < t.end;) {
    const int64_t blk = t.table[pos / t.block_size], first = pos % t.block_size;
    const int64_t count = std::min(t.block_size - first, t.end - pos);
    const int8_t* codes = c.data + blk * c.block + t.kv_head * c.head;
    const float* pairs = p ? p->data + blk * p->block + t.kv_head * p->head : nullptr;
    for (int64_t s = first; s < first + count; ++s)
      visit(pos - t.begin + s - first, codes + s * c.slot, pairs ? pairs + s * p->slot : nullptr);
    pos += count;
  }
}

// Scores of keys begin .. end - 1 for the group's rows, scores[r * len + j]: token-major keys, one at a time.
template <int D>
void scores_token_major(const Task& t, const Cache& k, const Pairs* kp, int group, float* scores) {
  const int64_t len = t.end - t.begin;
  for_each_key(t, k, kp, [&](int64_t j, const int8_t* code, const float* pair) {
    float key[D];
#pragma omp simd
    for (int d = 0; d < D; ++d) key[d] = static_cast<float>(code[d]);
    for (int r = 0; r < group; ++r) {
      const float* q = t.q + r * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < D; ++d) s += q[d] * key[d];
      scores[r * len + j] = pair ? pair[0] * (s - pair[1] * t.q_sums[r]) : s;
    }
  });
}

// 16 lanes of float32 (GCC/Clang vector extensions: one register on AVX-512, two on AVX2), and 16 int8 codes
// widened to them: with the instruction that does it where the compiler has it (GCC scalarises a vector-extension
// conversion from int8, and a plain array goes through the stack and stalls on store forwarding).
using f32x16 = float __attribute__((vector_size(64)));

inline f32x16 widen16(const int8_t* codes) {
  f32x16 out;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))));
  std::memcpy(&out, &v, sizeof out);
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
  std::memcpy(&out, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof lo, &hi, sizeof hi);
#else
  for (int j = 0; j < 16; ++j) out[j] = static_cast<float>(codes[j]);
#endif
  return out;
}

// 16 slots of one block, channel-major, against rows q[0 .. R - 1] (zero rows pad the group): a[r][j] = q_r . k_j.
// Reads all 16 slots (the caller keeps the ones it asked for); they lie in the block, whose size is a multiple of 16.
template <int D, int R>
void tile_channel_major(const int8_t* codes, int64_t channel_stride, const float* q, f32x16 (&out)[R]) {
  f32x16 even[R] = {}, odd[R] = {};  // in registers, two chains per row to hide the multiply-add latency
  for (int d = 0; d < D; d += 2) {
    const f32x16 key0 = widen16(codes + d * channel_stride), key1 = widen16(codes + (d + 1) * channel_stride);
    for (int r = 0; r < R; ++r) {
      even[r] += q[r * D + d] * key0;
      odd[r] += q[r * D + d + 1] * key1;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = even[r] + odd[r];
}

template <int D, int R>
void scores_channel_major(const Task& t, const Cache& k, const Pairs* kp, int group, const float* q_padded,
                          float* scores) {
  const int64_t len = t.end - t.begin;
  for (int64_t pos = t.begin; pos < t.end;) {
    const int64_t blk = t.table[pos / t.block_size], first = pos % t.block_size;
    const int64_t count = std::min(t.block_size - first, t.end - pos);
    const int8_t* codes = k.data + blk * k.block + t.kv_head * k.head;
    const float* pairs = kp ? kp->data + blk * kp->block + t.kv_head * kp->head : nullptr;
    for (int64_t s0 = first; s0 < first + count; s0 += 16) {
      const int64_t n = std::min<int64_t>(16, first + count - s0), j0 = pos - t.begin + s0 - first;
      for (int r0 = 0; r0 < group; r0 += R) {
        f32x16 a[R];
        tile_channel_major<D, R>(codes + s0, k.channel, q_padded + r0 * D, a);
        for (int r = r0; r < std::min(group, r0 + R); ++r)
          for (int64_t j = 0; j < n; ++j) {
            const float* pair = pairs ? pairs + (s0 + j) * kp->slot : nullptr;
            const float x = a[r - r0][j];
            scores[r * len + j0 + j] = pair ? pair[0] * (x - pair[1] * t.q_sums[r]) : x;
          }
      }
    }
    pos += count;
  }
}

// The softmax weights of up to R rows (weights[r * len + j]) times the values, accumulated in registers:
// acc[r] = sum_j w_rj * scale_j * code_j, and with the dynamic cache offset_sums[r] = sum_j w_rj * scale_j * offset_j.
template <int D, int R>
void value_pass(const Task& t, const Cache& v, const Pairs* vp, const float* weights, int rows, float* acc_out,
                float* offset_sums) {
  constexpr int C = D / 16;
  const int64_t len = t.end - t.begin;
  f32x16 acc[R][C] = {};
  float offsets[R] = {};
  for_each_key(t, v, vp, [&](int64_t j, const int8_t* code, const float* pair) {
    f32x16 value[C];
    for (int c = 0; c < C; ++c) value[c] = widen16(code + 16 * c);
    const float scale = pair ? pair[0] : 1.f;
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      const float w = weights[r * len + j] * scale;
      for (int c = 0; c < C; ++c) acc[r][c] += w * value[c];
      if (pair) offsets[r] += w * pair[1];
    }
  });
  for (int r = 0; r < rows; ++r) {
    std::memcpy(acc_out + r * D, acc[r], sizeof acc[r]);
    offset_sums[r] = offsets[r];
  }
}

// Partial result of one task: per row the running max, the softmax denominator and the unnormalised output.
template <int D>
void run_task(const Task& t, const Cache& k, const Cache& v, const Pairs* kp, const Pairs* vp, int group,
              const float* q_padded, float* m_out, float* l_out, float* acc_out) {
  const int64_t len = t.end - t.begin;
  std::vector<float> scores(static_cast<size_t>(group) * len);
  if (k.channel == 1)
    scores_token_major<D>(t, k, kp, group, scores.data());
  else if (group == 1)
    scores_channel_major<D, 1>(t, k, kp, group, q_padded, scores.data());
  else if (group == 2)
    scores_channel_major<D, 2>(t, k, kp, group, q_padded, scores.data());
  else if (group == 3)
    scores_channel_major<D, 3>(t, k, kp, group, q_padded, scores.data());
  else
    scores_channel_major<D, 4>(t, k, kp, group, q_padded, scores.data());
  for (int r = 0; r < group; ++r) {
    float* row = scores.data() + r * len;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) m = std::max(m, row[j]);
    float l = 0.f;
#pragma omp simd reduction(+ : l)
    for (int64_t j = 0; j < len; ++j) {
      // Below -87 expf underflows (to under 2e-38, nothing beside the largest weight 1), and libmvec hands such
      // lanes to its slow scalar path: clamp them.
      row[j] = expf(std::max(row[j] - m, -87.f));
      l += row[j];
    }
    m_out[r] = m;
    l_out[r] = l;
  }
  std::vector<float> offset_sums(group, 0.f);
  constexpr int RV = D == 64 ? 4 : D == 128 ? 2 : 1;  // rows per pass over the values: accumulators fill the registers
  for (int r0 = 0; r0 < group; r0 += RV)
    value_pass<D, RV>(t, v, vp, scores.data() + r0 * len, std::min(RV, group - r0), acc_out + r0 * D,
                      offset_sums.data() + r0);
  if (vp)
    for (int r = 0; r < group; ++r)
      for (int d = 0; d < D; ++d) acc_out[r * D + d] -= offset_sums[r];
}

// The query rows of sequence s and kv head h in float32, the softmax scale (and the static K scale) folded in; their
// sums (for the dynamic K offsets).
template <int D, typename T>
void fold_query(const T* query, const float* k_scale, float softmax_scale, int group, float* q, float* sums) {
  for (int r = 0; r < group; ++r) {
    float sum = 0.f;
    for (int d = 0; d < D; ++d) {
      q[r * D + d] = static_cast<float>(query[r * D + d]) * softmax_scale * (k_scale ? k_scale[d] : 1.f);
      sum += q[r * D + d];
    }
    sums[r] = sum;
  }
}

template <int D, typename T>
at::Tensor decode(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& k_scale,
                  const at::Tensor& v_scale, const at::Tensor& v_offset, const at::Tensor& k_pairs,
                  const at::Tensor& v_pairs, float softmax_scale) {
  const bool dynamic = k_pairs.defined();
  const int64_t seqs = query.size(0), heads = query.size(1), kv_heads = key_cache.size(2);
  const int group = static_cast<int>(heads / kv_heads);
  const int64_t block_size = key_cache.size(1), max_blocks = block_tables.size(1);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* td = block_tables.data_ptr<int32_t>();
  for (int64_t s = 0; s < seqs; ++s) {  // every page a row reads lies in the cache
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "context length ", lens[s], " of row ", s,
                " is outside 1 .. ", max_blocks * block_size, " (the block table's capacity)");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(td[s * max_blocks + b] >= 0 && td[s * max_blocks + b] < key_cache.size(0), "block ",
                  td[s * max_blocks + b], " of row ", s, " is not in the cache of ", key_cache.size(0), " blocks");
  }

  // Tasks: (sequence, partition) x kv head, and where each sequence's partitions start.
  std::vector<int64_t> first(seqs + 1, 0);
  for (int64_t s = 0; s < seqs; ++s) first[s + 1] = first[s] + (lens[s] + kPartition - 1) / kPartition;
  const int64_t parts = first[seqs];
  std::vector<int64_t> task_seq(parts);
  for (int64_t s = 0; s < seqs; ++s)
    for (int64_t p = first[s]; p < first[s + 1]; ++p) task_seq[p] = s;
  std::vector<float> m(parts * kv_heads * group), l(m.size()), acc(m.size() * D);

  const Cache k{key_cache.data_ptr<int8_t>(), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                key_cache.stride(3)};
  const Cache v{value_cache.data_ptr<int8_t>(), value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
                1};
  Pairs kp{}, vp{};
  if (dynamic) {
    kp = {k_pairs.data_ptr<float>(), k_pairs.stride(0), k_pairs.stride(1), k_pairs.stride(2)};
    vp = {v_pairs.data_ptr<float>(), v_pairs.stride(0), v_pairs.stride(1), v_pairs.stride(2)};
  }
  const T* qd = query.data_ptr<T>();
  const float* ks = dynamic ? nullptr : k_scale.data_ptr<float>();
  // Tasks dealt round-robin to the threads: contiguous ranges would give one thread every long partition of a short
  // batch (a row's last partition is often a few keys).
  const int64_t tasks = parts * kv_heads, threads = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> q((group + 3) / 4 * 4 * D, 0.f), sums(group);  // zero rows pad the group to tiles of 4
    for (int64_t deal = lo; deal < hi; ++deal)
      for (int64_t i = deal; i < tasks; i += threads) {
        const int64_t p = i / kv_heads, h = i % kv_heads, s = task_seq[p];
        const int64_t begin = (p - first[s]) * kPartition, end = std::min<int64_t>(lens[s], begin + kPartition);
        fold_query<D>(qd + (s * heads + h * group) * D, ks ? ks + h * D : nullptr, softmax_scale, group, q.data(),
                      sums.data());
        const Task t{q.data(), sums.data(), td + s * max_blocks, h, begin, end, block_size};
        run_task<D>(t, k, v, dynamic ? &kp : nullptr, dynamic ? &vp : nullptr, group, q.data(), &m[i * group],
                    &l[i * group], &acc[i * group * D]);
      }
  });

  // Merge each sequence's partitions, in order.
  at::Tensor out = at::empty_like(query);
  T* od = out.data_ptr<T>();
  const float* vs = dynamic ? nullptr : v_scale.data_ptr<float>();
  const float* vo = dynamic ? nullptr : v_offset.data_ptr<float>();
  at::parallel_for(0, seqs * kv_heads, 16, [&](int64_t lo, int64_t hi) {  // a short batch merges on one thread
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t s = i / kv_heads, h = i % kv_heads;
      for (int r = 0; r < group; ++r) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t p = first[s]; p < first[s + 1]; ++p) mx = std::max(mx, m[(p * kv_heads + h) * group + r]);
        float denom = 0.f, o[D] = {};
        for (int64_t p = first[s]; p < first[s + 1]; ++p) {
          const int64_t at = (p * kv_heads + h) * group + r;
          const float w = std::exp(m[at] - mx);
          denom += l[at] * w;
          for (int d = 0; d < D; ++d) o[d] += acc[at * D + d] * w;
        }
        T* dst = od + (s * heads + h * group + r) * D;
        for (int d = 0; d < D; ++d) {
          const float x = o[d] / denom;
          dst[d] = static_cast<T>(dynamic ? x : (x - vo[h * D + d]) * vs[h * D + d]);
        }
      }
    }
  });
  return out;
}

template <int D>
at::Tensor decode_any(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                      const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& k_scale,
                      const at::Tensor& v_scale, const at::Tensor& v_offset, const at::Tensor& k_pairs,
                      const at::Tensor& v_pairs, float softmax_scale) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention_int8", [&] {
    return decode<D, scalar_t>(query, key_cache, value_cache, block_tables, seq_lens, k_scale, v_scale, v_offset,
                               k_pairs, v_pairs, softmax_scale);
  });
}

at::Tensor paged_attention_int8(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens,
                             const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                             const std::optional<at::Tensor>& v_offset, const std::optional<at::Tensor>& k_pairs,
                             const std::optional<at::Tensor>& v_pairs, double softmax_scale) {
  // The Python callers check shapes and values (qpass/runtime/paged_checks.py); these guard the memory reads.
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous(), "query must be a contiguous [seqs, heads, head_dim]");
  TORCH_CHECK(key_cache.scalar_type() == at::kChar && value_cache.scalar_type() == at::kChar, "int8 caches expected");
  TORCH_CHECK(value_cache.stride(3) == 1, "the value cache must be token-major (channels contiguous)");
  TORCH_CHECK(key_cache.stride(3) == 1 ||
                  (key_cache.stride(1) == 1 && key_cache.size(1) % 16 == 0 && kPartition % key_cache.size(1) == 0),
              "the key cache must be token-major, or channel-major with blocks of a multiple of 16 slots");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() && seq_lens.numel() == query.size(0),
              "block_tables and seq_lens must be contiguous int32, one row per query");
  const bool dynamic = k_pairs.has_value();
  TORCH_CHECK(dynamic == v_pairs.has_value() && dynamic != k_scale.has_value(),
              "pass the static scales or the dynamic pairs, not both");
  auto channels = [](const std::optional<at::Tensor>& t) {
    if (!t) return at::Tensor();
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "scales must be contiguous float32");
    return *t;
  };
  auto pairs = [](const std::optional<at::Tensor>& t) {
    if (!t) return at::Tensor();
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->stride(3) == 1, "dynamic pairs must be float32, pair-contiguous");
    return *t;
  };
  const at::Tensor ks = channels(k_scale), vs = channels(v_scale), vo = channels(v_offset);
  const at::Tensor kp = pairs(k_pairs), vp = pairs(v_pairs);
  const float scale = static_cast<float>(softmax_scale);
  switch (query.size(2)) {
    case 64:
      return decode_any<64>(query, key_cache, value_cache, block_tables, seq_lens, ks, vs, vo, kp, vp, scale);
    case 128:
      return decode_any<128>(query, key_cache, value_cache, block_tables, seq_lens, ks, vs, vo, kp, vp, scale);
    case 256:
      return decode_any<256>(query, key_cache, value_cache, block_tables, seq_lens, ks, vs, vo, kp, vp, scale);
  }
  TORCH_CHECK(false, "head_dim must be 64, 128 or 256");
}

// clamp(round(x / scale) + offset, -128, 127), rounding half to even as torch.round does (qpass/core/int8.py).
inline int8_t quantize(float x, float scale, float offset) {
  return static_cast<int8_t>(std::min(127.f, std::max(-128.f, std::nearbyint(x / scale) + offset)));
}

template <typename T>
void write(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& slots, const float* scale,
           const float* offset, const at::Tensor& pairs) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), block_size = cache.size(1);
  const T* xd = x.data_ptr<T>();
  const int64_t* sd = slots.data_ptr<int64_t>();
  int8_t* cd = cache.data_ptr<int8_t>();
  float* pd = pairs.defined() ? pairs.data_ptr<float>() : nullptr;
  at::parallel_for(0, tokens * heads, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i / heads, h = i % heads, slot = sd[t];
      if (slot < 0) continue;  // a padding token: vLLM's -1
      const int64_t blk = slot / block_size, pos = slot % block_size;
      int8_t* dst = cd + blk * cache.stride(0) + pos * cache.stride(1) + h * cache.stride(2);
      const T* src = xd + (t * heads + h) * dim;
      if (pd) {  // the dynamic cache: this token and head's asymmetric pair from its min and max
        float lo_x = 0.f, hi_x = 0.f;
        for (int64_t d = 0; d < dim; ++d) {
          lo_x = std::min(lo_x, static_cast<float>(src[d]));
          hi_x = std::max(hi_x, static_cast<float>(src[d]));
        }
        float step = (hi_x - lo_x) / 255.f;
        step = step > 0.f ? std::max(step, std::numeric_limits<float>::min()) : 1.f;
        const float zero = std::min(127.f, std::max(-128.f, std::nearbyint(-lo_x / step) - 128.f));
        for (int64_t d = 0; d < dim; ++d) dst[d * cache.stride(3)] = quantize(static_cast<float>(src[d]), step, zero);
        float* pair = pd + blk * pairs.stride(0) + pos * pairs.stride(1) + h * pairs.stride(2);
        pair[0] = step;
        pair[1] = zero;
      } else {
        for (int64_t d = 0; d < dim; ++d)
          dst[d * cache.stride(3)] = quantize(static_cast<float>(src[d]), scale[h * dim + d], offset[h * dim + d]);
      }
    }
  });
}

void check_write(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& slots,
                 const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset,
                 const std::optional<at::Tensor>& pairs) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && cache.dim() == 4 && cache.scalar_type() == at::kChar &&
                  x.size(1) == cache.size(2) && x.size(2) == cache.size(3),
              "K and V must be contiguous [tokens, kv_heads, head_dim] and their caches int8 of the same heads and dim");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "slots must be contiguous int64, one per token");
  const int64_t capacity = cache.size(0) * cache.size(1);
  for (int64_t t = 0; t < slots.numel(); ++t)
    TORCH_CHECK(slots.data_ptr<int64_t>()[t] < capacity, "slot ", slots.data_ptr<int64_t>()[t], " is past the cache's ",
                capacity);
  TORCH_CHECK(pairs.has_value() != scale.has_value(), "pass the static grids or the dynamic pairs");
  if (scale) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && offset &&
                    offset->scalar_type() == at::kFloat && offset->is_contiguous() &&
                    scale->numel() == x.size(1) * x.size(2) && offset->numel() == scale->numel(),
                "scales and offsets must be contiguous float32 [kv_heads, head_dim]");
  } else {
    TORCH_CHECK(pairs->scalar_type() == at::kFloat && pairs->dim() == 4 && pairs->size(3) == 2 &&
                    pairs->stride(3) == 1 && pairs->size(0) == cache.size(0) && pairs->size(1) == cache.size(1) &&
                    pairs->size(2) == cache.size(2),
                "pairs must be float32 [blocks, block_size, kv_heads, 2], each pair contiguous");
  }
}

// Quantize new K and V [tokens, kv_heads, head_dim] into their slots of caches [blocks, block_size, kv_heads,
// head_dim] of any strides: on the static per-channel grids (scale, offset), or per token and head with its pair
// written to pairs [blocks, block_size, kv_heads, 2] (the dynamic cache). The same codes as qpass/core/int8.py.
void write_int8(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                const at::Tensor& value_cache, const at::Tensor& slots, const std::optional<at::Tensor>& k_scale,
                const std::optional<at::Tensor>& k_offset, const std::optional<at::Tensor>& v_scale,
                const std::optional<at::Tensor>& v_offset, const std::optional<at::Tensor>& k_pairs,
                const std::optional<at::Tensor>& v_pairs) {
  check_write(key, key_cache, slots, k_scale, k_offset, k_pairs);
  check_write(value, value_cache, slots, v_scale, v_offset, v_pairs);
  auto data = [](const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; };
  auto tensor = [](const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "write_int8", [&] {
    write<scalar_t>(key, key_cache, slots, data(k_scale), data(k_offset), tensor(k_pairs));
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "write_int8", [&] {
    write<scalar_t>(value, value_cache, slots, data(v_scale), data(v_offset), tensor(v_pairs));
  });
}

}  // namespace

TORCH_LIBRARY(qpass_cpu, m) {
  m.def(
      "paged_attention_int8(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor? k_scale, Tensor? v_scale, Tensor? v_offset, Tensor? k_pairs, Tensor? v_pairs, float softmax_scale) "
      "-> Tensor");
  m.impl("paged_attention_int8", c10::DispatchKey::CPU, &paged_attention_int8);
  m.def(
      "write_int8(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots, "
      "Tensor? k_scale, Tensor? k_offset, Tensor? v_scale, Tensor? v_offset, Tensor(c!)? k_pairs, Tensor(d!)? v_pairs) "
      "-> ()");
  m.impl("write_int8", c10::DispatchKey::CPU, &write_int8);
}
