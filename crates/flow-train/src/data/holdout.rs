//! A validation set held out of the training rows.

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::Dataset;

/// The share of the rows held out for validation when no validation set is given.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;

/// Checks a validation fraction: 0 (no validation set) or more, below 1.
pub fn check_val_fraction(fraction: f64) -> Result<(), String> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(format!(
            "the validation fraction must lie in [0, 1), got {fraction}"
        ));
    }
    Ok(())
}

/// The rows of `data` that `indices` name, in that order, with their context; rows
/// held as pixel bytes stay bytes.
fn select(data: &Dataset, indices: &[usize]) -> Dataset {
    let (d, c) = (data.dim, data.context_dim);
    let pick = |all: &[f32], width: usize| -> Vec<f32> {
        if all.is_empty() {
            return Vec::new();
        }
        indices
            .iter()
            .flat_map(|&i| all[i * width..(i + 1) * width].iter().copied())
            .collect()
    };
    let pixels = if data.pixels.is_empty() {
        Vec::new()
    } else {
        indices
            .iter()
            .flat_map(|&i| data.pixels[i * d..(i + 1) * d].iter().copied())
            .collect()
    };
    Dataset {
        dim: d,
        values: pick(&data.values, d),
        pixels,
        context_dim: c,
        context: pick(&data.context, c),
    }
}

/// The rows [`hold_out`] holds out of `n` for `fraction`: `⌊fraction · n⌋`, none when
/// that would leave no row to train on.
pub fn held_out_rows(n: usize, fraction: f64) -> usize {
    let n_val = (fraction * n as f64).floor() as usize;
    if n_val >= n {
        0
    } else {
        n_val
    }
}

/// Checks that holding out `fraction` of `n` rows leaves at least two to train on.
pub fn check_rows_left(n: usize, fraction: f64) -> Result<(), String> {
    let held = held_out_rows(n, fraction);
    if held > 0 && n - held < 2 {
        return Err(format!(
            "--val-fraction {fraction} holds out {held} of {n} rows, leaving {} to train on: a density cannot be fitted to a single point",
            n - held
        ));
    }
    Ok(())
}

/// Splits `data` into training rows and `⌊fraction · n⌋` validation rows, drawn by a
/// shuffle seeded with `seed`; each part keeps the rows in their original order. No
/// validation set (`None`) when that is no row; `fraction` must pass
/// [`check_val_fraction`], which leaves at least one training row.
pub fn hold_out(data: &Dataset, fraction: f64, seed: u64) -> (Dataset, Option<Dataset>) {
    let (n, n_val) = (data.len(), held_out_rows(data.len(), fraction));
    if n_val == 0 {
        return (data.clone(), None);
    }
    let mut order: Vec<usize> = (0..n).collect();
    // A stream of its own, apart from the seed's use for initialisation and batches.
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0xA5A5_5A5A_C3C3_3C3C));
    let (val, train) = order.split_at_mut(n_val);
    val.sort_unstable();
    train.sort_unstable();
    (select(data, train), Some(select(data, val)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_out_leaves_two_rows_to_train_on() {
        assert!(check_rows_left(300, 0.99).is_ok());
        assert!(check_rows_left(1, 0.5).is_ok(), "nothing held out");
        let err = check_rows_left(300, 0.999).unwrap_err();
        assert!(err.starts_with("--val-fraction 0.999 holds out 299 of 300 rows, leaving 1"));
    }

    #[test]
    fn holds_out_a_seeded_share_of_the_rows_with_their_context() {
        // Row i is (i, −i) with context 10·i, so every part can be traced to its row.
        let n = 25;
        let values: Vec<f32> = (0..n).flat_map(|i| [i as f32, -(i as f32)]).collect();
        let data = Dataset {
            dim: 2,
            values,
            context_dim: 1,
            context: (0..n).map(|i| 10.0 * i as f32).collect(),
            ..Dataset::default()
        };
        let (train, val) = hold_out(&data, 0.1, 3);
        let val = val.expect("2 rows held out");
        assert_eq!((train.len(), val.len()), (23, 2));
        let mut seen: Vec<usize> = Vec::new();
        for part in [&train, &val] {
            for (row, c) in part.values.chunks(2).zip(&part.context) {
                let i = row[0] as usize;
                assert_eq!((row[1], *c), (-(i as f32), 10.0 * i as f32));
                seen.push(i);
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        // The same seed holds out the same rows; another seed others.
        assert_eq!(hold_out(&data, 0.1, 3).1, Some(val.clone()));
        let others: Vec<Dataset> = (4..10).filter_map(|s| hold_out(&data, 0.1, s).1).collect();
        assert!(others.iter().any(|v| *v != val));
        // Nothing to hold out: every row trains.
        assert_eq!(hold_out(&data, 0.0, 3), (data.clone(), None));
        assert_eq!(hold_out(&data, 0.03, 3), (data, None));
    }

    #[test]
    fn fractions_outside_zero_to_one_are_refused() {
        for f in [0.0, 0.1, 0.99] {
            assert_eq!(check_val_fraction(f), Ok(()));
        }
        for f in [-0.1, 1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(
                check_val_fraction(f),
                Err(format!(
                    "the validation fraction must lie in [0, 1), got {f}"
                ))
            );
        }
    }
}
