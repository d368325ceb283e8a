//! Vectorisable f32 math for the CPU kernels: `exp` and `erf` as branch-free polynomials,
//! and `multiversion!`, which compiles a kernel's loop once more with AVX-512 (and once with
//! AVX2 + FMA) and picks the widest the CPU has at run time.
//!
//! The release binary targets baseline x86-64, and libm's `expf`/`erff` are scalar calls, so
//! every softmax, SiLU and GELU element cost a function call: `expf` alone was 9 % of a full
//! SD1.5 step (perf). The polynomials here are plain arithmetic that the compiler turns into
//! 16-lane AVX-512 code inside a `multiversion!` kernel.

/// exp(x) for f32, relative error below 3e-7 on [−87, 88] (tested); inputs are clamped to that range
/// (exp(−87) ≈ 1.6e−38 stands in for the smaller values, which vanish beside any sum they
/// join in the softmax and the activations). NaN is not propagated.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // exp(x) = 2^n · exp(r) with n = round(x / ln 2) and |r| ≤ ln 2 / 2.
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| ≤ 128.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 · 2^23 rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(LOG2_E, ROUND);
    let n = t - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    // Taylor to degree 7: the remainder at |r| = 0.347 is 3e−9 relative. Horner steps as
    // fused multiply-adds: one instruction each inside a `multiversion!` kernel's AVX2/AVX-512
    // versions (~6 % off the attention's CPU time against a multiply and an add). On an
    // x86-64 CPU without FMA (before Haswell, 2013) the baseline version calls libm's `fmaf`
    // for each and is several times slower, but correct.
    let p = (1.0 / 5040.0f32)
        .mul_add(r, 1.0 / 720.0)
        .mul_add(r, 1.0 / 120.0)
        .mul_add(r, 1.0 / 24.0)
        .mul_add(r, 1.0 / 6.0)
        .mul_add(r, 0.5)
        .mul_add(r, 1.0)
        .mul_add(r, 1.0);
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    f32::from_bits(((n_bits + 127) << 23) as u32) * p
}

/// erf(x) for f32, absolute error below 3e-7: erf(x) = 1 − erfc(|x|) with the sign of x, and
/// erfc(a) = t · exp(−a² + P(t)), t = 1 / (1 + a/2), Numerical Recipes' `erfcc` Chebyshev fit
/// (relative error below 1.2e−7 for every a ≥ 0).
// The coefficients are the published fit's, digit for digit.
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp(-a * a + poly);
    let e = 1.0 - erfc;
    if x < 0.0 { -e } else { e }
}

/// Lanes of the partial sums and maxima below: one AVX-512 register of f32.
const LANES: usize = 16;

/// Lanes of f64 partial sums: one AVX-512 register.
pub(crate) const F64_LANES: usize = 8;

/// Σ f(x) over `xs` in f64, `F64_LANES` interleaved partial sums (vectorises, as below).
#[inline(always)]
pub(crate) fn sum_f64(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; F64_LANES];
    let mut chunks = xs.chunks_exact(F64_LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f64>()
}

/// Replaces each element x of `xs` with exp(x − shift) and returns their sum, in one pass, in
/// `LANES` interleaved partial sums (a single running sum is a chain of dependent additions
/// the compiler must keep in order, which does not vectorise).
#[inline(always)]
pub(crate) fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp(*x - shift);
            *a += *x;
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest element of `xs` (−∞ for none), lane-wise like `exp_shifted_sum`. NaNs are skipped.
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    acc.iter().fold(tail, |a, &x| if x > a { x } else { a })
}

/// Defines `fn $name(args) -> ret` whose body is compiled three times, for AVX-512, for
/// AVX2 + FMA and for the baseline, and runs the widest the CPU supports. The body should be
/// plain loops over slices calling the `#[inline(always)]` helpers above, so they vectorise.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(unsafe_code)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma,bmi2")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("bmi2")
                {
                    // SAFETY: the CPU has every feature `v4` is compiled for (checked above).
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for `v3`.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    multiversion! {
        fn exp_all(xs: &[f32], out: &mut [f32]) {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = exp(x);
            }
        }
    }

    #[test]
    fn exp_matches_libm_across_the_range() {
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + i as f32 * 175.0 / 200_000.0)
            .collect();
        let mut ours = vec![0f32; xs.len()];
        exp_all(&xs, &mut ours);
        for (&x, &e) in xs.iter().zip(&ours) {
            let want = f64::from(x).exp();
            let rel = ((f64::from(e) - want) / want).abs();
            assert!(
                rel < 3e-7,
                "exp({x}) = {e}, want {want} (relative error {rel:e})"
            );
        }
        // Far below the range: a tiny positive number, not zero or garbage.
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn lane_wise_max_and_exp_sum_cover_every_element() {
        for len in [0usize, 1, 15, 16, 17, 100] {
            let xs: Vec<f32> = (0..len).map(|i| ((i * 7) % 23) as f32 - 5.0).collect();
            let want = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), want, "max of {len}");
            let mut ex = xs.clone();
            let total = exp_shifted_sum(&mut ex, 2.0);
            let want: Vec<f32> = xs.iter().map(|x| (x - 2.0).exp()).collect();
            for (a, b) in ex.iter().zip(&want) {
                assert!((a - b).abs() <= 3e-7 * b, "exp_shifted_sum of {len}");
            }
            let want_sum: f32 = want.iter().sum();
            assert!(
                (total - want_sum).abs() <= 1e-5 * want_sum.max(1.0),
                "sum of {len}"
            );
        }
    }

    #[test]
    fn erf_matches_the_reference() {
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            let got = f64::from(erf(x));
            assert!((got - want).abs() < 3e-7, "erf({x}) = {got}, want {want}");
        }
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(-0.5) + erf(0.5)).abs() < 1e-7);
    }
}
