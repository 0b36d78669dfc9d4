// Scalar conversions between fp32 and the two 16-bit float storage formats, bf16 and IEEE fp16, with
// round-to-nearest-even (the rounding PyTorch and CUDA use). Header-only and dependency-free so that
// host code, tests and CUDA-free kernel headers can share one definition. Owns bit patterns only:
// no buffers, no dtype enums, no I/O.
#pragma once

#include <cstdint>
#include <cstring>

namespace needle::engine {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float FloatFromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 is the upper 16 bits of an fp32. NaN stays NaN (quiet bit set); overflow rounds to +-inf.
inline uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN
  // Add 0x7fff plus the lowest kept bit: ties go to the even upper half.
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Bf16ToFloat(uint16_t h) { return FloatFromBits(static_cast<uint32_t>(h) << 16); }

// The nearest bf16-representable fp32 value (ties to even).
inline float RoundToBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits; subnormals down to 2^-24; max 65504.
inline uint16_t FloatToFp16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (or inf): inf
  if (a < 0x38800000u) {
    // |f| < 2^-14: fp16 subnormal (or zero). Value = m * 2^-24 with m = round(|f| * 2^24).
    if (a < 0x33000000u) return sign;  // |f| < 2^-25: rounds to zero (2^-25 itself is handled below)
    const uint32_t exp = a >> 23;      // biased fp32 exponent, 102..112
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;  // 24-bit significand, |f| = mant * 2^(exp-150)
    const uint32_t shift = 126 - exp;                   // mant * 2^(exp-150) / 2^-24 = mant >> shift
    uint32_t m = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (m & 1u))) ++m;  // may carry into the smallest normal: fine
    return static_cast<uint16_t>(sign | m);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to even.
  uint32_t h = a - 0x38000000u;  // exponent - 112 in the fp32 layout
  h += 0x0fffu + ((h >> 13) & 1u);
  return static_cast<uint16_t>(sign | (h >> 13));  // a carry into the exponent is the correct result
}

inline float Fp16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return FloatFromBits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return FloatFromBits(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return FloatFromBits(sign);
  // Subnormal: normalise. Value = mant * 2^-24.
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return FloatFromBits(sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((mant & 0x3ffu) << 13));
}

inline float RoundToFp16(float f) { return Fp16ToFloat(FloatToFp16(f)); }

}  // namespace needle::engine
