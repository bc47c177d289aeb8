//! `flow train --bounds`: the box the data live in.

use flow_core::Bound;

use crate::Failure;

/// One side of an entry: a number, or `-inf`/`inf` for an open side.
fn side(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok()
}

/// `--bounds LOW:HIGH,…`, one entry per data column, each checked.
pub(super) fn parse_bounds(text: &str, dim: usize) -> Result<Vec<Bound>, Failure> {
    let entries: Vec<&str> = text.split(',').collect();
    if entries.len() != dim {
        return Err(format!(
            "--bounds gives {} entries for {dim} data columns: give one LOW:HIGH per column",
            entries.len()
        )
        .into());
    }
    entries
        .iter()
        .enumerate()
        .map(|(j, entry)| {
            let wrong = |why: String| -> Failure {
                format!("--bounds entry {} `{}`: {why}", j + 1, entry.trim()).into()
            };
            let (low, high) = entry
                .split_once(':')
                .ok_or_else(|| wrong("expected LOW:HIGH, e.g. -1:1 or 0:inf".into()))?;
            let (Some(low), Some(high)) = (side(low), side(high)) else {
                return Err(wrong(
                    "expected two numbers, LOW:HIGH (-inf or inf for an open side)".into(),
                ));
            };
            if low == f64::INFINITY || high == f64::NEG_INFINITY {
                return Err(wrong("the lower end must be below the upper end".into()));
            }
            let bound = Bound::new(
                (low != f64::NEG_INFINITY).then_some(low),
                (high != f64::INFINITY).then_some(high),
            );
            bound.validate().map_err(wrong)?;
            Ok(bound)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str, dim: usize) -> String {
        match parse_bounds(text, dim) {
            Err(e) => e.message,
            Ok(b) => panic!("{text} accepted as {b:?}"),
        }
    }

    #[test]
    fn reads_one_interval_per_column_and_refuses_the_rest() {
        let b = parse_bounds("-1:1, 0:inf,-inf:2.5,-inf:inf", 4).expect("valid");
        assert_eq!(
            b,
            [
                Bound::new(Some(-1.0), Some(1.0)),
                Bound::new(Some(0.0), None),
                Bound::new(None, Some(2.5)),
                Bound::unbounded(),
            ]
        );
        assert_eq!(
            refused("-1:1", 2),
            "--bounds gives 1 entries for 2 data columns: give one LOW:HIGH per column"
        );
        assert_eq!(
            refused("-1:1,1:0", 2),
            "--bounds entry 2 `1:0`: the lower bound 1 is not below the upper bound 0"
        );
        assert_eq!(
            refused("2:2", 1),
            "--bounds entry 1 `2:2`: the lower bound 2 is not below the upper bound 2"
        );
        assert_eq!(
            refused("nan:1", 1),
            "--bounds entry 1 `nan:1`: a bound must be a finite number (or absent for an open side), got NaN"
        );
        assert_eq!(
            refused("0:x", 1),
            "--bounds entry 1 `0:x`: expected two numbers, LOW:HIGH (-inf or inf for an open side)"
        );
        assert_eq!(
            refused("0", 1),
            "--bounds entry 1 `0`: expected LOW:HIGH, e.g. -1:1 or 0:inf"
        );
        assert_eq!(
            refused("inf:inf", 1),
            "--bounds entry 1 `inf:inf`: the lower end must be below the upper end"
        );
    }
}
