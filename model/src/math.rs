//! Scalar math the fused kernels (here and in `sft`'s loss) run per element.

/// `e^x` in f32 without libm: Cephes' `expf` scheme (range reduction by ln 2 split in two
/// constants, a degree-5 polynomial, the exponent assembled from bits). Branch-free, so the
/// compiler vectorises loops over it, where libm's `expf` is a scalar call with a slow path for
/// results that underflow. Relative error below 2e-7 (checked against f64 in the tests); inputs
/// below about -87.3 give about 1e-38 instead of a subnormal or zero, which only matters where
/// such a value is not summed next to something of order one.
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Plain multiply-adds and rounding by the 1.5 * 2^23 trick: the binary targets baseline
    // x86-64, where `mul_add` and `round_ties_even` are libm calls, not instructions.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_54, 88.722_83);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2^n from exponent bits; n is in [-126, 128] after the clamp, where 2^128 and the
    // subnormals have no exponent field of their own, so it is built as 2^a * 2^(n-a) with both
    // halves normal.
    // n as an integer, read from the bits of ROUND + n (consecutive floats there differ by one
    // in their bits): `n as i32` is a saturating conversion that the compiler does not
    // vectorise, and it made the whole loop around this function scalar.
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let a = n >> 1;
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    y * pow2(a) * pow2(n - a)
}

/// tanh in f32 as `1 - 2 / (e^2x + 1)` over [`exp_f32`]: branch-free like it, where libm's
/// `tanhf` was a tenth of a GPT step (GELU). Absolute error below 3e-7 (relative error grows for
/// |x| under 1e-3, where GELU multiplies it by x/2 anyway).
#[inline]
pub fn tanh_f32(x: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * x) + 1.0)
}

/// Whether this CPU has AVX2 and FMA, so that a kernel compiled for them may run. The binary
/// targets baseline x86-64 (SSE2), where the compiler vectorises 4 floats wide; the hottest
/// row kernels also have an AVX2 copy (8 wide), chosen per call with this check (cached by std).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `$body` compiled for AVX2 and FMA when the CPU has them, else as baseline code: the body
/// is a closure called from inside a `#[target_feature]` function, where it is inlined and
/// vectorised for the wider registers. Results are the same either way: only the vector width of
/// element-wise work changes, not the order of any sum (`lanes` fixes that).
#[macro_export]
macro_rules! with_avx2 {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if $crate::math::has_avx2() {
                // SAFETY: the CPU has the features `wide` is compiled for.
                unsafe { wide(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// [`with_avx2!`] with a third tier: AVX-512 (16 floats wide) where the CPU has it. For loops
/// bound by arithmetic, where the wider registers pay: those around `exp_f32` (GELU, SiLU, the
/// attention and loss softmaxes) and AdamW's square root and division; loops bound by memory
/// (rotary embedding) keep the AVX2 tier. Same results in every tier.
#[macro_export]
macro_rules! with_avx512 {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn widest<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if $crate::math::has_avx512() {
                // SAFETY: the CPU has the features `widest` is compiled for.
                unsafe { widest(|| $body) }
            } else {
                $crate::with_avx2!($body)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// Whether this CPU has AVX-512F as well as AVX2 and FMA.
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Folds `xs` into eight interleaved accumulators with `f`, then the accumulators into one with
/// `merge`: eight independent dependency chains, so a running max or sum vectorises where a
/// single chain stays scalar. The order of operations is fixed by the length alone.
#[inline]
pub fn lanes<S: Copy, T: Copy>(
    xs: &[S],
    init: T,
    f: impl Fn(T, S) -> T,
    merge: impl Fn(T, T) -> T,
) -> T {
    let mut acc = [init; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    let tail = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    acc.iter().fold(tail, |a, &x| merge(a, x))
}

/// The float types the kernels run on (f32 for training, f64 for gradient checks).
pub(crate) trait Real:
    Copy + Send + Sync + PartialOrd + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self>
{
    const ZERO: Self;
    const NEG_INF: Self;
    /// Below this, `exp` rounds to exactly zero; skipping the call there keeps results
    /// bit-identical and avoids libm's slow underflow path (masked scores are -1e9).
    const EXP_ZERO_BELOW: Self;
    fn exp(self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn of(v: f64) -> Self;
}

/// The same methods on both float types.
macro_rules! impl_real {
    ($t:ty, $exp_zero_below:expr, $exp:path, $tanh:path) => {
        impl Real for $t {
            const ZERO: $t = 0.0;
            const NEG_INF: $t = <$t>::NEG_INFINITY;
            const EXP_ZERO_BELOW: $t = $exp_zero_below;
            fn exp(self) -> $t {
                $exp(self)
            }
            fn mul(self, o: $t) -> $t {
                self * o
            }
            fn div(self, o: $t) -> $t {
                self / o
            }
            fn tanh(self) -> $t {
                $tanh(self)
            }
            fn sqrt(self) -> $t {
                <$t>::sqrt(self)
            }
            #[allow(clippy::unnecessary_cast)]
            fn of(v: f64) -> $t {
                v as $t
            }
        }
    };
}

// exp(-104) is below half the smallest f32 subnormal, exp(-746) below half the smallest f64 one.
impl_real!(f32, -104.0, exp_f32, tanh_f32);
impl_real!(f64, -746.0, f64::exp, f64::tanh);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate_across_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_73;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e9) < 1e-37);
        assert!(exp_f32(1e9).is_finite());
    }

    #[test]
    fn the_avx2_and_avx512_copies_of_a_kernel_give_the_baseline_bits() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.37).sin() * 30.0)
            .collect();
        let kernel = |xs: &[f32]| {
            let e: Vec<f32> = xs.iter().map(|&x| tanh_f32(exp_f32(x) - 3.0)).collect();
            let sum = lanes(&e, 0f64, |a, x| a + x as f64, |a, b| a + b);
            (e, sum)
        };
        let baseline = kernel(&xs);
        for wide in [
            crate::with_avx2!(kernel(&xs)),
            crate::with_avx512!(kernel(&xs)),
        ] {
            assert_eq!(baseline.1.to_bits(), wide.1.to_bits());
            assert!(baseline
                .0
                .iter()
                .zip(&wide.0)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn lanes_fold_every_element_once() {
        for n in [0, 1, 7, 8, 9, 31, 100] {
            let xs: Vec<u64> = (1..=n).collect();
            assert_eq!(lanes(&xs, 0, |a, x| a + x, |a, b| a + b), n * (n + 1) / 2);
            assert_eq!(lanes(&xs, 0, |a, x| a.max(x), |a, b| a.max(b)), n);
        }
    }

    #[test]
    fn tanh_f32_is_accurate_across_its_range() {
        let mut worst = 0f64;
        let mut x = -50.0f32;
        while x < 50.0 {
            let want = (x as f64).tanh();
            worst = worst.max((tanh_f32(x) as f64 - want).abs());
            x += 0.000_91;
        }
        assert!(worst < 3e-7, "worst absolute error {worst}");
        assert_eq!(tanh_f32(1e9), 1.0);
        assert_eq!(tanh_f32(-1e9), -1.0);
    }
}
