// Every decoder layer of a decode-only step of an int8 model on the CPU, in one call.
//
// Each layer: RMSNorm -> fused q/k/v int8 linear -> rotate-half RoPE of q and k -> k, v into the
// paged KV cache -> paged attention decode -> o_proj int8 linear -> residual add -> RMSNorm ->
// (predictor) -> sparse FFN on int8 rows -> residual add, with the per-layer FFN counts the
// Python path reports (active neurons per token, rows read). The kernels are the ones the
// Python path calls one by one (linear_int8_cpu, paged_attention_decode_cpu, linear_cpu,
// sparse_ffn_cpu); what this file adds is the glue (norms, RoPE, cache writes, adds) and one
// call per step instead of ~25 Python-level ops per layer.
// NOTE: at batch 1 on SmolLM2 (30 layers) those ops cost ~6 of a 16 ms step: more than the
// attention and FFN weight reads they surround (docs/benchmarks/quantization.md).
//
// Numerics: as the Python path computes them (fp32, and the int8 kernels' activation grids), but
// the norms and RoPE are summed in another order (and may contract to FMAs), so results agree to
// fp32 rounding plus the odd value that lands on the next grid point, not bit for bit
// (tests/engine/test_fused_decode_cpu.py).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "int8_rows.h"

extern "C" {
int linear_int8_cpu(const void* x, const void* w, const float* scale, void* out, int64_t M, int64_t K,
                    int64_t N, int dtype, int x_bits, int w_bits, int num_threads);
int linear_cpu(const float* x, const void* w, const float* scale, float* out, int64_t T, int64_t K,
               int64_t N, int dtype, int num_threads);
int paged_attention_decode_cpu(const void* q, const void* k_cache, const void* v_cache, const int32_t* block_tables,
                               const int32_t* context_lens, void* out, int64_t S, int64_t Hq, int64_t Hkv,
                               int64_t D, int64_t block_size, int64_t max_blocks, float scale, int64_t window,
                               int dtype);
int sparse_ffn_cpu(const float* x, const void* w_gate, const void* w_up, const void* w_down_t,
                   const float* scale_gate, const float* scale_up, const float* scale_down,
                   const uint8_t* predicted, float* h, uint8_t* active, uint8_t* any_active,
                   float* out, int64_t* read, int64_t T, int64_t H, int64_t I, int act,
                   float threshold, int dtype, int x_bits, int num_threads);
}

namespace {

constexpr int kInt8 = 3;     // sparse_ffn_cpu / linear_cpu weight dtype code
constexpr int kInt4 = 4;     // sparse_ffn_cpu's for 4-bit rows
constexpr int kFloat32 = 0;  // linear_int8_cpu / paged_attention_decode_cpu activation dtype code

// One layer's weights and cache, as raw pointers (kernels/decode_layers_cpu.py builds them).
struct Layer {
  const float* input_norm;     // [H]
  const float* post_norm;      // [H]
  const void* w_qkv;           // [(Hq + 2 Hkv) D, H] (int8 or 4-bit rows: w_bits)
  const float* s_qkv;          // [(Hq + 2 Hkv) D]
  const void* w_o;             // [H, Hq D]
  const float* s_o;            // [H]
  float* k_cache;              // [num_blocks, block_size, Hkv, D]
  float* v_cache;
  const void* w_gate;          // [I, H]
  const void* w_up;            // [I, H]
  const void* w_down_t;        // [I, H]
  const float* s_gate;         // [I]
  const float* s_up;           // [I]
  const float* s_down;         // [H]
  const int8_t* fc1;           // [r, H] or null (no predictor in use)
  const int8_t* fc2;           // [I, r]
  const float* s_fc1;          // [r]
  const float* s_fc2;          // [I]
  int64_t rank;
  float act_threshold;         // the FFN activation's (SparseMLP.act_threshold)
  float predictor_threshold;   // a neuron is predicted iff its logit exceeds it (per layer: calibrated)
};
static_assert(sizeof(Layer) == 20 * 8, "Layer must match kernels/decode_layers_cpu.py LayerPointers");

// sum(x[0:n]^2): 16 lanes of partial sums where AVX-512 is built. NOTE: the one running sum was
// a chain of n dependent adds the compiler may not reorder (no fast-math here): ~20 us per norm
// of 16 SmolLM2 rows, two norms a layer, on one thread while the others waited.
inline float sum_squares(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = int8_rows::lanes16(n - k);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float sum = 0.f;
  for (int64_t k = 0; k < n; ++k) sum += x[k] * x[k];
  return sum;
#endif
}

// out[t] = weight * (x[t] * rsqrt(mean(x[t]^2) + eps)), as engine/models/layers.py RMSNorm.
void rms_norm(const float* x, const float* weight, float* out, int64_t T, int64_t H, float eps) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * H;
    const float sum = sum_squares(xt, H);
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(H) + eps);
    for (int64_t k = 0; k < H; ++k) out[t * H + k] = weight[k] * (xt[k] * inv);
  }
}

// dst[i] = src[i] * cos[i] + src[(i + D/2) % D] * sin_signed[i]: rotate-half RoPE of one head,
// with the sign folded into sin as AttentionMetadata.rope_tables builds it.
inline void rotate_head(const float* src, const float* cos, const float* sin_signed, float* dst, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) dst[i] = src[i] * cos[i] + src[i < half ? i + half : i - half] * sin_signed[i];
}

}  // namespace

extern "C" {

// x [T, H] float32 (the residual stream after the embedding; updated in place to the last
// layer's output). cos, sin_signed [T, D]; slots [T] int64 (flat KV-cache slots of the new
// tokens); block_tables [T, max_blocks] int32; context_lens [T] int32 (including the new token).
// layers: num_layers Layer structs. act: ACT_CODES. x_bits: the activation grid of the int8
// linears and FFN gate/up products (16 or 8; int8_rows.h). w_bits: 8 (int8 weights) or 4 (4-bit
// rows, int4_rows.h) for q/k/v, o_proj and the FFN; the predictors are int8 either way.
// active_counts [num_layers, T] int32 and rows_read [num_layers, 3] int64 are written.
// Returns 0, or the failing kernel's code + 10 * (its index: 1 qkv, 2 attention, 3 o_proj,
// 4 predictor, 5 ffn).
int decode_layers_cpu(float* x, const float* cos, const float* sin_signed, const int64_t* slots,
                      const int32_t* block_tables, const int32_t* context_lens, const Layer* layers,
                      int64_t num_layers, int64_t T, int64_t H, int64_t I, int64_t Hq, int64_t Hkv,
                      int64_t D, int64_t block_size, int64_t max_blocks, float eps, float attn_scale,
                      int64_t window, int act, int x_bits, int w_bits, int32_t* active_counts,
                      int64_t* rows_read, int num_threads) {
  const int64_t nq = Hq * D, nkv = Hkv * D, nqkv = nq + 2 * nkv;
  std::vector<float> xn(T * H), qkv(T * nqkv), q(T * nq), attn(T * nq), o(T * H), ffn(T * H), h(T * I);
  std::vector<uint8_t> active(T * I), any_active(I), predicted;
  std::vector<float> z, logits;
  for (int64_t l = 0; l < num_layers; ++l) {
    const Layer& L = layers[l];
    rms_norm(x, L.input_norm, xn.data(), T, H, eps);
    int rc = linear_int8_cpu(xn.data(), L.w_qkv, L.s_qkv, qkv.data(), T, H, nqkv, kFloat32, x_bits, w_bits,
                             num_threads);
    if (rc != 0) return rc + 10;
    for (int64_t t = 0; t < T; ++t) {
      const float* row = qkv.data() + t * nqkv;
      const float* c = cos + t * D;
      const float* s = sin_signed + t * D;
      for (int64_t hd = 0; hd < Hq; ++hd) rotate_head(row + hd * D, c, s, q.data() + t * nq + hd * D, D);
      float* k_slot = L.k_cache + slots[t] * nkv;
      float* v_slot = L.v_cache + slots[t] * nkv;
      for (int64_t hd = 0; hd < Hkv; ++hd) rotate_head(row + nq + hd * D, c, s, k_slot + hd * D, D);
      std::memcpy(v_slot, row + nq + nkv, sizeof(float) * nkv);
    }
    rc = paged_attention_decode_cpu(q.data(), L.k_cache, L.v_cache, block_tables, context_lens, attn.data(), T, Hq,
                                    Hkv, D, block_size, max_blocks, attn_scale, window, kFloat32);
    if (rc != 0) return rc + 20;
    rc = linear_int8_cpu(attn.data(), L.w_o, L.s_o, o.data(), T, nq, H, kFloat32, x_bits, w_bits, num_threads);
    if (rc != 0) return rc + 30;
    for (int64_t k = 0; k < T * H; ++k) x[k] += o[k];
    rms_norm(x, L.post_norm, xn.data(), T, H, eps);
    const uint8_t* pred = nullptr;
    if (L.fc1 != nullptr) {   // NOTE: the predictor reads the residual stream before the norm
      z.resize(T * L.rank);
      logits.resize(T * I);
      predicted.resize(T * I);
      rc = linear_cpu(x, L.fc1, L.s_fc1, z.data(), T, H, L.rank, kInt8, num_threads);
      if (rc == 0) {
        for (float& v : z) v = v > 0.f ? v : 0.f;
        rc = linear_cpu(z.data(), L.fc2, L.s_fc2, logits.data(), T, L.rank, I, kInt8, num_threads);
      }
      if (rc != 0) return rc + 40;
      for (int64_t k = 0; k < T * I; ++k) predicted[k] = logits[k] > L.predictor_threshold;
      pred = predicted.data();
    }
    rc = sparse_ffn_cpu(xn.data(), L.w_gate, L.w_up, L.w_down_t, L.s_gate, L.s_up, L.s_down, pred, h.data(),
                        active.data(), any_active.data(), ffn.data(), rows_read + 3 * l, T, H, I, act,
                        L.act_threshold, w_bits == 4 ? kInt4 : kInt8, x_bits, num_threads);
    if (rc != 0) return rc + 50;
    for (int64_t k = 0; k < T * H; ++k) x[k] += ffn[k];
    for (int64_t t = 0; t < T; ++t) {
      int32_t count = 0;
      for (int64_t i = 0; i < I; ++i) count += active[t * I + i];
      active_counts[l * T + t] = count;
    }
  }
  return 0;
}

}  // extern "C"
