//! Products of row-major matrices in the column-major terms of cuBLAS, which the CUDA
//! paths of networks (`mlp/cuda.rs`) and convolutions (`conv/cuda.rs`) call; tested
//! here, on the CPU, against the row-major products they stand for.

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
    /// `C (m × n) = op(A)·op(B)` on dense row-major buffers: `A` lies as `(m × k)`, or
    /// as `(k × m)` when `a_transposed`; `B` as `(k × n)`, or `(n × k)` when
    /// `b_transposed`. In cuBLAS's terms that is `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so cuBLAS's first
    /// operand is `B`'s buffer and its second `A`'s.
    pub fn row_major(m: usize, n: usize, k: usize, a_transposed: bool, b_transposed: bool) -> Self {
        Self {
            trans_a: b_transposed,
            trans_b: a_transposed,
            m: n,
            n: m,
            k,
            lda: if b_transposed { k } else { n },
            ldb: if a_transposed { m } else { k },
            ldc: n,
            accumulate: false,
        }
    }

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

#[cfg(feature = "cuda")]
mod blas {
    use candle::cuda_backend::cudarc::cublas::{
        sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig,
    };
    use candle::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use candle::cuda_backend::CudaDType;
    use candle::{Result, WithDType};

    use super::Product;

    /// The float types cuBLAS multiplies.
    pub(crate) trait Blas: DeviceRepr + WithDType + ValidAsZeroBits + CudaDType {}
    impl<T: DeviceRepr + WithDType + ValidAsZeroBits + CudaDType> Blas for T where CudaBlas: Gemm<T> {}

    fn int(n: usize) -> Result<i32> {
        i32::try_from(n).map_err(|_| candle::Error::Msg(format!("{n} is too large for cuBLAS")))
    }

    impl Product {
        /// The call's arguments, with `α = 1`.
        pub(crate) fn config<T: WithDType>(&self) -> Result<GemmConfig<T>> {
            let op = |t: bool| {
                if t {
                    cublasOperation_t::CUBLAS_OP_T
                } else {
                    cublasOperation_t::CUBLAS_OP_N
                }
            };
            Ok(GemmConfig {
                transa: op(self.trans_a),
                transb: op(self.trans_b),
                m: int(self.m)?,
                n: int(self.n)?,
                k: int(self.k)?,
                alpha: T::one(),
                lda: int(self.lda)?,
                ldb: int(self.ldb)?,
                beta: if self.accumulate { T::one() } else { T::zero() },
                ldc: int(self.ldc)?,
            })
        }
    }
}
#[cfg(feature = "cuda")]
pub(crate) use blas::Blas;

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

    #[test]
    fn row_major_products_take_either_operand_transposed() {
        let (m, n, k) = (4, 3, 5);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, b) = (values(m * k, 5), values(k * n, 6));
            let at = |i: usize, l: usize| if a_t { a[l * m + i] } else { a[i * k + l] };
            let bt = |l: usize, j: usize| if b_t { b[j * k + l] } else { b[l * n + j] };
            let mut c = vec![f64::NAN; m * n];
            // cuBLAS's first operand is B's buffer.
            gemm(&Product::row_major(m, n, k, a_t, b_t), &b, &a, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
                    assert!(
                        (c[i * n + j] - want).abs() < 1e-12,
                        "{a_t} {b_t} ({i}, {j})"
                    );
                }
            }
        }
    }
}
