//! A layer's products in the column-major terms of cuBLAS, which the CUDA path of
//! networks of any shape calls (`cuda.rs`); tested here, on the CPU, against the
//! row-major products they stand for.

/// A product in cuBLAS's column-major terms: `C (m × n, ldc) = op(A)·op(B) + β·C`,
/// `op(A)` `m × k` and `op(B)` `k × n`. A row-major matrix is the column-major
/// transpose of itself, so each of a layer's products is one call on the row-major
/// buffers as they lie, the parameters `p = [W | b]` `(n, k + 1)` included (the
/// leading dimension `k + 1` steps over the bias column).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Product {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    /// `β = 1` (add to `C`) rather than `β = 0`.
    pub accumulate: bool,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Product {
    /// `z = h·Wᵀ` `(rows, n)` from `h` `(rows, k)`: `A = p`, `B = h`, `C = z`.
    pub fn layer(rows: usize, k: usize, n: usize) -> Self {
        Self {
            trans_a: true,
            trans_b: false,
            m: n,
            n: rows,
            k,
            lda: k + 1,
            ldb: k,
            ldc: n,
            accumulate: false,
        }
    }

    /// `g = dz·W` `(rows, k)` from `dz` `(rows, n)`: `A = p`, `B = dz`, `C = g`.
    pub fn input(rows: usize, k: usize, n: usize) -> Self {
        Self {
            trans_a: false,
            trans_b: false,
            m: k,
            n: rows,
            k: n,
            lda: k + 1,
            ldb: n,
            ldc: k,
            accumulate: false,
        }
    }

    /// `∂W += dzᵀ·h` into the gradient laid out as `p`: `A = h`, `B = dz`, `C = ∂p`.
    pub fn weights(rows: usize, k: usize, n: usize) -> Self {
        Self {
            trans_a: false,
            trans_b: true,
            m: k,
            n,
            k: rows,
            lda: k,
            ldb: n,
            ldc: k + 1,
            accumulate: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Product;

    /// `C = op(A)·op(B) + β·C` as cuBLAS defines it on column-major buffers (with
    /// `β = 0` it does not read `C`).
    fn gemm(p: &Product, a: &[f64], b: &[f64], c: &mut [f64]) {
        for j in 0..p.n {
            for i in 0..p.m {
                let mut acc = 0.0;
                for l in 0..p.k {
                    let av = if p.trans_a {
                        a[l + i * p.lda]
                    } else {
                        a[i + l * p.lda]
                    };
                    let bv = if p.trans_b {
                        b[j + l * p.ldb]
                    } else {
                        b[l + j * p.ldb]
                    };
                    acc += av * bv;
                }
                let at = i + j * p.ldc;
                c[at] = if p.accumulate { acc + c[at] } else { acc };
            }
        }
    }

    fn values(n: usize, seed: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13) % 17) as f64 / 8.0 - 1.0)
            .collect()
    }

    #[test]
    fn products_compute_the_layers_row_major_products() {
        for (rows, k, n) in [(5, 3, 4), (1, 7, 2), (6, 1, 9)] {
            let (h, p, dz) = (
                values(rows * k, 1),
                values(n * (k + 1), 2),
                values(rows * n, 3),
            );
            let w = |j: usize, i: usize| p[j * (k + 1) + i];

            let mut z = vec![f64::NAN; rows * n];
            gemm(&Product::layer(rows, k, n), &p, &h, &mut z);
            for r in 0..rows {
                for j in 0..n {
                    let want: f64 = (0..k).map(|i| h[r * k + i] * w(j, i)).sum();
                    assert!((z[r * n + j] - want).abs() < 1e-12, "layer {rows} {k} {n}");
                }
            }

            let mut g = vec![f64::NAN; rows * k];
            gemm(&Product::input(rows, k, n), &p, &dz, &mut g);
            for r in 0..rows {
                for i in 0..k {
                    let want: f64 = (0..n).map(|j| dz[r * n + j] * w(j, i)).sum();
                    assert!((g[r * k + i] - want).abs() < 1e-12, "input {rows} {k} {n}");
                }
            }

            // Added to what is there, the bias column untouched.
            let before = values(n * (k + 1), 4);
            let mut gp = before.clone();
            gemm(&Product::weights(rows, k, n), &h, &dz, &mut gp);
            for j in 0..n {
                for i in 0..=k {
                    let add: f64 = if i < k {
                        (0..rows).map(|r| dz[r * n + j] * h[r * k + i]).sum()
                    } else {
                        0.0
                    };
                    let at = j * (k + 1) + i;
                    assert!(
                        (gp[at] - before[at] - add).abs() < 1e-12,
                        "weights {rows} {k} {n}"
                    );
                }
            }
        }
    }
}
