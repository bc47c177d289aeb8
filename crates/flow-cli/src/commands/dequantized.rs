//! `--dequantized`: an image model's rows as continuous values in [0, 1), the model's
//! own input space (a pixel `p` of `L` levels lies there as `(p + u) / L`), rather
//! than pixel values.

use flow_core::ImageInfo;

use crate::Failure;

/// `--dequantized` applies to image models only.
pub fn applies(given: bool, image: Option<ImageInfo>) -> Result<(), Failure> {
    if given && image.is_none() {
        return Err(
            "--dequantized applies to image models (rows of continuous pixel values in [0, 1)); this model is not one"
                .into(),
        );
    }
    Ok(())
}

/// The first value of rows of `dim` values outside [0, 1) (NaN included), as its
/// 1-based row and column and the value.
pub fn outside(values: &[f32], dim: usize) -> Option<(usize, usize, f32)> {
    let i = values.iter().position(|v| !(0.0..1.0).contains(v))?;
    let dim = dim.max(1);
    Some((i / dim + 1, i % dim + 1, values[i]))
}

/// Checks that rows of `dim` values read from `what`, the first of them row
/// `first_row + 1` of the file, lie in [0, 1).
pub fn check_rows(values: &[f32], dim: usize, first_row: usize, what: &str) -> Result<(), Failure> {
    match outside(values, dim) {
        None => Ok(()),
        Some((row, col, v)) => Err(format!(
            "{what}: row {}, column {col}: {v} is outside [0, 1), the space --dequantized reads",
            first_row + row
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_value_outside_the_unit_interval_is_found() {
        assert_eq!(outside(&[0.0, 0.5, 0.999, 0.25], 2), None);
        assert_eq!(outside(&[0.0, 0.5, 0.2, 1.0], 2), Some((2, 2, 1.0)));
        assert_eq!(outside(&[0.0, -0.0, 0.2, -1e-7], 2), Some((2, 2, -1e-7)));
        let nan = outside(&[0.1, f32::NAN], 2).expect("NaN is outside");
        assert_eq!((nan.0, nan.1), (1, 2));
        let err = check_rows(&[0.5, 0.5, 0.5, 2.0], 2, 10, "x.csv").expect_err("outside");
        assert_eq!(
            err.message,
            "x.csv: row 12, column 2: 2 is outside [0, 1), the space --dequantized reads"
        );
    }
}
