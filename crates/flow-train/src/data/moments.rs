//! Per-feature mean and standard deviation, the statistics a model standardises its
//! inputs with, accumulated a block of rows at a time so that data streamed from a
//! file get exactly the numbers the same rows held in memory get.

/// Two passes over the same rows in the same order: [`add_to_mean`](Self::add_to_mean)
/// for every block, then [`add_to_variance`](Self::add_to_variance) for every block.
#[derive(Debug, Clone)]
pub struct Moments {
    rows: f64,
    mean: Vec<f64>,
    var: Vec<f64>,
}

impl Moments {
    /// For `rows` rows in all of `dim` features.
    pub fn new(rows: usize, dim: usize) -> Self {
        Self {
            rows: rows as f64,
            mean: vec![0.0; dim],
            var: vec![0.0; dim],
        }
    }

    /// First pass: a block of rows, row-major.
    pub fn add_to_mean(&mut self, values: &[f32]) {
        let n = self.rows;
        for row in values.chunks(self.mean.len()) {
            row.iter()
                .zip(&mut self.mean)
                .for_each(|(v, m)| *m += *v as f64 / n);
        }
    }

    /// Second pass: a block of rows, row-major, after the mean saw them all.
    pub fn add_to_variance(&mut self, values: &[f32]) {
        let n = self.rows;
        for row in values.chunks(self.mean.len()) {
            for ((v, m), s) in row.iter().zip(&self.mean).zip(&mut self.var) {
                *s += (*v as f64 - m).powi(2) / n;
            }
        }
    }

    /// The mean and (population) standard deviation; constant features get 1.
    pub fn finish(self) -> (Vec<f32>, Vec<f32>) {
        let std = self
            .var
            .iter()
            .map(|v| {
                if v.sqrt() > 1e-12 {
                    v.sqrt() as f32
                } else {
                    1.0
                }
            })
            .collect();
        (self.mean.iter().map(|m| *m as f32).collect(), std)
    }
}
