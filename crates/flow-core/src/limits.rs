//! Upper bounds on the sizes a model configuration, a file or a command-line flag may
//! ask for. Each is checked, in checked arithmetic, before anything of that size is
//! allocated, so that a hostile or mistyped number is a one-line error rather than an
//! aborted allocation. The bounds are generous: each is far beyond what a model trained
//! on one machine needs, and small enough that a tensor of that size can be allocated.

/// Features of one data point (a model's `dim`, its context features, the pixels times
/// channels of an image): 2²⁴ = 16 777 216, room for a 2048×2048 RGB image (12.6 M).
pub const MAX_DIM: usize = 1 << 24;

/// Width of a hidden layer, or hidden channels of a convolution: 65 536. The widest
/// published flow conditioners use 512 to 2048; a square weight matrix of this width
/// is already 16 GiB in f32.
pub const MAX_HIDDEN: usize = 1 << 16;

/// Components of a mixture base distribution: 65 536 (mixtures of a few hundred are
/// already slow to fit).
pub const MAX_COMPONENTS: usize = 1 << 16;

/// Bins of a rational-quadratic spline: 1 000. Splines of 8 to 64 bins are the norm;
/// with the usual minimum bin width of 1e-3 no more than 999 fit anyway.
pub const MAX_BINS: usize = 1000;

/// Layers of a stack (coupling or autoregressive layers, hidden layers of a network,
/// flow steps per level, image scales): 1 024. Every layer keeps activations for the
/// backward pass, and published flows stay far below this (Glow uses 32 per level).
pub const MAX_LAYERS: usize = 1 << 10;

/// Values a pixel takes: 65 536, a 16-bit image.
pub const MAX_PIXEL_LEVELS: u32 = 1 << 16;

/// Samples drawn, or rows written, by one command: 2²⁶ = 67 108 864 rows. A CSV of that
/// many 2-D rows is about 3 GB.
pub const MAX_SAMPLES: usize = 1 << 26;

/// Rows of a data set: 2³² − 1, beyond what fits in memory at any dimension; it keeps
/// positions in the data (a training run's, say) far from overflow.
pub const MAX_ROWS: usize = u32::MAX as usize;

/// Values in one tensor a configuration implies (a weight matrix `in × out`, a
/// convolution kernel, a mixture's means): 2³⁰, 4 GiB in f32. Each size above may be
/// within its own bound while their product is not.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 30;

/// An error naming `what` (a plural noun: "features", "spline bins") if `value` is
/// above `max`.
pub fn check_at_most(what: &str, value: usize, max: usize) -> Result<(), String> {
    if value > max {
        return Err(format!("{value} {what}: more than the limit of {max}"));
    }
    Ok(())
}

/// The product of `factors`, or an error naming `what` if it overflows or exceeds
/// `max`.
pub fn checked_product(what: &str, factors: &[usize], max: usize) -> Result<usize, String> {
    let product = factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .filter(|&p| p <= max);
    product.ok_or_else(|| {
        let spelled: Vec<String> = factors.iter().map(|f| f.to_string()).collect();
        format!(
            "{what} of {} values: more than the limit of {max}",
            spelled.join(" × ")
        )
    })
}

/// Checks a dense network's widths, `[inputs, hidden…, outputs]`: every hidden width at
/// most [`MAX_HIDDEN`], and every weight matrix at most [`MAX_TENSOR_ELEMENTS`].
pub fn check_dense(widths: &[usize]) -> Result<(), String> {
    if let [_, hidden @ .., _] = widths {
        for &h in hidden {
            check_at_most("hidden units in a layer", h, MAX_HIDDEN)?;
        }
    }
    for pair in widths.windows(2) {
        checked_product("a weight matrix", pair, MAX_TENSOR_ELEMENTS)?;
    }
    Ok(())
}

/// Whether `v` is positive and stays a positive, finite number as an `f32`, the type
/// the tensors it scales are trained in.
pub fn positive_f32(v: f64) -> bool {
    let single = v as f32;
    v > 0.0 && single.is_finite() && single > 0.0
}

/// The value `v` of the setting `--{flag}`, checked to lie in `[min, max]` before
/// anything of that size is made.
pub fn check_count(flag: &str, v: usize, min: usize, max: usize) -> Result<usize, String> {
    if v < min {
        return Err(format!("--{flag} must be at least {min}, got {v}"));
    }
    if v > max {
        return Err(format!(
            "--{flag} {v} is more than the largest allowed, {max}"
        ));
    }
    Ok(v)
}

/// `v` as a message shows it: in exponent form where plain digits would run long
/// (`1e-320` rather than 320 zeros).
pub fn number(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// The value `v` of the setting `--{flag}`, checked to be positive and finite as the
/// `f32` it becomes.
pub fn check_positive(flag: &str, v: f64) -> Result<f64, String> {
    if !positive_f32(v) {
        let v = number(v);
        return Err(format!(
            "--{flag} must be positive and finite in f32 (below {:e}), got {v}",
            f32::MAX
        ));
    }
    Ok(v)
}

/// The value `v` of the setting `--{flag}`, checked to be zero or positive and finite
/// as the `f32` it becomes (a setting whose zero turns it off).
pub fn check_non_negative(flag: &str, v: f64) -> Result<f64, String> {
    if v == 0.0 {
        return Ok(0.0);
    }
    if !positive_f32(v) {
        let v = number(v);
        return Err(format!(
            "--{flag} must be at least 0 and finite in f32 (below {:e}), got {v}",
            f32::MAX
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_messages_stay_short() {
        assert_eq!(number(1e-320), "1e-320");
        assert_eq!(number(-3e38), "-3e38");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(
            check_positive("clamp", 1e-320).unwrap_err(),
            "--clamp must be positive and finite in f32 (below 3.4028235e38), got 1e-320"
        );
    }

    #[test]
    fn products_that_wrap_are_refused() {
        // 2305843009213693954 · 8 wraps to 16 in 64 bits.
        let err = checked_product("an image", &[2_305_843_009_213_693_954, 8, 1], MAX_DIM)
            .expect_err("wraps");
        assert_eq!(
            err,
            format!(
                "an image of 2305843009213693954 × 8 × 1 values: more than the limit of {MAX_DIM}"
            )
        );
        assert_eq!(checked_product("an image", &[3, 32, 32], MAX_DIM), Ok(3072));
    }

    #[test]
    fn dense_networks_are_bounded_by_width_and_by_matrix() {
        assert_eq!(check_dense(&[2, 64, 64, 4]), Ok(()));
        assert_eq!(
            check_dense(&[2, 99_999_999_999, 4]),
            Err(format!(
                "99999999999 hidden units in a layer: more than the limit of {MAX_HIDDEN}"
            ))
        );
        let err = check_dense(&[MAX_DIM, MAX_HIDDEN, 2]).expect_err("too large");
        assert!(
            err.starts_with("a weight matrix of 16777216 × 65536 values"),
            "{err}"
        );
    }
}
