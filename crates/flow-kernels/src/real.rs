//! The floats the kernels run on, and the one piece of arithmetic that needs each its
//! own code: the exponential of a softmax's shifted logits, the spline's bins and the
//! attention's weights alike.

use num_traits::Float;

/// A float an op's plain loops run on, f32 or f64 (the convolution, ActNorm, the LU
/// weight).
pub(crate) trait Elem:
    Float + std::ops::AddAssign + candle::WithDType + Send + Sync + 'static
{
}
impl Elem for f32 {}
impl Elem for f64 {}

/// A float with the softmax exponential the kernels share.
pub(crate) trait Real: Float + Send + Sync + crate::Unwritten {
    /// `eᵛ` of each value `v ≤ 0` in place (a softmax's logits less their maximum).
    fn exp_nonpositive(v: &mut [Self]);
}

impl Real for f64 {
    fn exp_nonpositive(v: &mut [f64]) {
        v.iter_mut().for_each(|v| *v = v.exp());
    }
}

impl Real for f32 {
    /// Cody–Waite reduction `v = n ln 2 + r`, `|r| ≤ ln 2 / 2`, and Cephes' degree-6
    /// polynomial for `eʳ` (about one ulp), in plain arithmetic so that the loop over a
    /// softmax's bins vectorises, where the library's `expf` is one call per value.
    fn exp_nonpositive(v: &mut [f32]) {
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        // ln 2 split so that `n · LN2_HI` is exact for the `n` that arise.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // Adding then subtracting 1.5 · 2²³ rounds to the nearest integer.
        const ROUND: f32 = 12_582_912.0;
        // Below it eᵛ is under the smallest normal float: flushed to 2⁻¹²⁶ · eʳ.
        const LOWEST: f32 = -87.0;
        const P: [f32; 6] = [
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ];
        for v in v.iter_mut() {
            // Not `max`, which would turn a NaN into a number.
            let x = if *v < LOWEST { LOWEST } else { *v };
            let n = (x * LOG2_E + ROUND) - ROUND;
            let r = x - n * LN2_HI - n * LN2_LO;
            let p = P.iter().fold(0.0, |p, &c| p * r + c);
            let e = p * r * r + r + 1.0;
            // 2ⁿ from its exponent bits: −126 ≤ n ≤ 0 here.
            let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
            *v = e * two_n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Real;

    #[test]
    fn the_f32_softmax_exponential_is_within_two_ulps_of_the_library_one() {
        let mut xs: Vec<f32> = (0..=173_900).map(|i| -(i as f32) * 5e-4).collect();
        xs.extend([-1e-7, -0.346_573_6, -0.346_573_7, -86.999, -87.0]);
        let mut e = xs.clone();
        f32::exp_nonpositive(&mut e);
        for (&x, &e) in xs.iter().zip(&e) {
            let want = x.exp();
            let ulps = (e.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "e^{x}: {e} against {want} ({ulps} ulps)");
        }
        // Below the normal range: at most the smallest normal float, never more.
        let mut tiny = [-88.0f32, -100.0, -1e30, f32::NEG_INFINITY];
        f32::exp_nonpositive(&mut tiny);
        assert!(tiny.iter().all(|&e| (0.0..=2e-38).contains(&e)), "{tiny:?}");
        // A NaN stays one, so that a broken step is seen as broken.
        let mut nan = [f32::NAN];
        f32::exp_nonpositive(&mut nan);
        assert!(nan[0].is_nan());
    }
}
