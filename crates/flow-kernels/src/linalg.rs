//! Small dense linear algebra for invertible 1×1 convolutions: an LU decomposition
//! with partial pivoting on the host, and from it two differentiable ops candle lacks,
//! the matrix inverse and `log|det|`.
//!
//! The matrices are `c×c` with `c` a channel count (tens to hundreds), so the work is
//! done on the host in `f64` whatever the tensor's dtype and device: the matrix is
//! copied to the CPU, the op runs there, and the result is copied back (both copies are
//! differentiable). The cost is O(c³) per call, independent of the batch.

use candle::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor,
};

/// `P·A = L·U` for a square `A`: `lu` holds `L` (unit lower, diagonal implied) below the
/// diagonal and `U` on and above it; row `i` of `P·A` is row `perm[i]` of `A`.
#[derive(Debug, Clone)]
pub struct Lu {
    n: usize,
    lu: Vec<f64>,
    perm: Vec<usize>,
}

impl Lu {
    /// Factors the row-major `n×n` matrix `a`, choosing at each column the row of the
    /// largest magnitude as the pivot (so every multiplier is at most 1 in magnitude).
    /// A zero pivot, a singular matrix, is an error.
    pub fn new(a: &[f64], n: usize) -> std::result::Result<Self, String> {
        if a.len() != n * n {
            return Err(format!("{} values for a {n}×{n} matrix", a.len()));
        }
        let mut lu = a.to_vec();
        let mut perm: Vec<usize> = (0..n).collect();
        for k in 0..n {
            let p = (k..n)
                .max_by(|&i, &j| lu[i * n + k].abs().total_cmp(&lu[j * n + k].abs()))
                .unwrap_or(k);
            let pivot = lu[p * n + k];
            if pivot == 0.0 || !pivot.is_finite() {
                return Err(format!("the {n}×{n} matrix is singular or not finite"));
            }
            if p != k {
                for j in 0..n {
                    lu.swap(k * n + j, p * n + j);
                }
                perm.swap(k, p);
            }
            for i in k + 1..n {
                let f = lu[i * n + k] / pivot;
                lu[i * n + k] = f;
                for j in k + 1..n {
                    lu[i * n + j] -= f * lu[k * n + j];
                }
            }
        }
        Ok(Self { n, lu, perm })
    }

    /// `log|det A| = Σ log|U_ii|` (a permutation and a unit triangle have |det| 1).
    pub fn log_abs_det(&self) -> f64 {
        (0..self.n)
            .map(|i| self.lu[i * (self.n + 1)].abs().ln())
            .sum()
    }

    /// `A⁻¹`, row-major: each column solves `A·x = e_j` as `L·y = P·e_j` (forward
    /// substitution) then `U·x = y` (back substitution).
    pub fn inverse(&self) -> Vec<f64> {
        let n = self.n;
        let mut inv = vec![0.0; n * n];
        let mut x = vec![0.0; n];
        for j in 0..n {
            for (i, xi) in x.iter_mut().enumerate() {
                *xi = if self.perm[i] == j { 1.0 } else { 0.0 };
            }
            for i in 0..n {
                let s: f64 = (0..i).map(|k| self.lu[i * n + k] * x[k]).sum();
                x[i] -= s;
            }
            for i in (0..n).rev() {
                let s: f64 = (i + 1..n).map(|k| self.lu[i * n + k] * x[k]).sum();
                x[i] = (x[i] - s) / self.lu[i * n + i];
            }
            for i in 0..n {
                inv[i * n + j] = x[i];
            }
        }
        inv
    }

    /// The factors as matrices with `A = P·L·U` (row-major): the permutation matrix
    /// `P` (the transpose of the one applied to the rows), unit lower `L` and upper `U`.
    pub fn factors(&self) -> [Vec<f64>; 3] {
        let n = self.n;
        let mut p = vec![0.0; n * n];
        let mut l = vec![0.0; n * n];
        let mut u = vec![0.0; n * n];
        for i in 0..n {
            // (P_rows·A)_i = A_{perm[i]}, so A = P_rowsᵀ·L·U with P_rowsᵀ[perm[i], i] = 1.
            p[self.perm[i] * n + i] = 1.0;
            for j in 0..n {
                match i.cmp(&j) {
                    std::cmp::Ordering::Greater => l[i * n + j] = self.lu[i * n + j],
                    std::cmp::Ordering::Equal => {
                        l[i * n + j] = 1.0;
                        u[i * n + j] = self.lu[i * n + j];
                    }
                    std::cmp::Ordering::Less => u[i * n + j] = self.lu[i * n + j],
                }
            }
        }
        [p, l, u]
    }
}

/// An orthogonal matrix from the row-major `n×n` matrix `a` (Gram–Schmidt on its
/// columns, twice for accuracy): for a Gaussian `a`, a uniformly random rotation or
/// reflection, Glow's initial 1×1 convolution. A column that is (numerically) in the
/// span of the earlier ones is replaced by the first unit vector that is not, so the
/// result is orthogonal for any input.
pub fn orthogonal(a: &[f64], n: usize) -> Vec<f64> {
    let mut cols: Vec<Vec<f64>> = Vec::with_capacity(n);
    let dot = |u: &[f64], v: &[f64]| -> f64 { u.iter().zip(v).map(|(x, y)| x * y).sum() };
    let reduce = |v: &mut Vec<f64>, basis: &[Vec<f64>]| -> f64 {
        for _ in 0..2 {
            for q in basis {
                let d = dot(v, q);
                for (x, y) in v.iter_mut().zip(q) {
                    *x -= d * y;
                }
            }
        }
        dot(v, v).sqrt()
    };
    for j in 0..n {
        let mut v: Vec<f64> = (0..n).map(|i| a[i * n + j]).collect();
        let mut norm = reduce(&mut v, &cols);
        let mut e = 0;
        while !(norm > 1e-8 && norm.is_finite()) && e < n {
            v = (0..n).map(|i| if i == e { 1.0 } else { 0.0 }).collect();
            norm = reduce(&mut v, &cols);
            e += 1;
        }
        v.iter_mut().for_each(|x| *x /= norm);
        cols.push(v);
    }
    let mut q = vec![0.0; n * n];
    for (j, col) in cols.iter().enumerate() {
        for (i, x) in col.iter().enumerate() {
            q[i * n + j] = *x;
        }
    }
    q
}

/// The row-major values of a square matrix on the CPU, as `f64`.
fn host_matrix(storage: &CpuStorage, layout: &Layout, op: &str) -> Result<(Vec<f64>, usize)> {
    let n = match layout.dims() {
        [r, c] if r == c => *r,
        dims => bail!("{op} takes a square matrix, got {dims:?}"),
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op} takes a contiguous matrix");
    };
    let values = match storage {
        CpuStorage::F32(v) => v[start..end].iter().map(|&x| f64::from(x)).collect(),
        CpuStorage::F64(v) => v[start..end].to_vec(),
        other => bail!("{op} takes f32 or f64, got {:?}", other.dtype()),
    };
    Ok((values, n))
}

/// `values` in the dtype of `like`.
fn same_dtype(like: &CpuStorage, values: Vec<f64>) -> CpuStorage {
    match like {
        CpuStorage::F32(_) => CpuStorage::F32(values.into_iter().map(|x| x as f32).collect()),
        _ => CpuStorage::F64(values),
    }
}

/// Runs a host op on `a`, wherever `a` lives.
fn on_host(a: &Tensor, op: impl CustomOp1 + Send + Sync + 'static) -> Result<Tensor> {
    let device = a.device().clone();
    let host = a.to_device(&Device::Cpu)?.contiguous()?;
    host.apply_op1(op)?.to_device(&device)
}

/// `A⁻¹` with gradient `−A⁻ᵀ·G·A⁻ᵀ`.
struct MatrixInverse;

impl CustomOp1 for MatrixInverse {
    fn name(&self) -> &'static str {
        "matrix-inverse"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, n) = host_matrix(storage, layout, self.name())?;
        let inv = Lu::new(&a, n).map_err(candle::Error::Msg)?.inverse();
        Ok((same_dtype(storage, inv), Shape::from((n, n))))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // d(A⁻¹) = −A⁻¹·dA·A⁻¹, so ⟨G, d(A⁻¹)⟩ = ⟨−A⁻ᵀ·G·A⁻ᵀ, dA⟩.
        let inv_t = res.t()?;
        Ok(Some(inv_t.matmul(grad_res)?.matmul(&inv_t)?.neg()?))
    }
}

/// `log|det A|` (a scalar) with gradient `g·A⁻ᵀ`.
struct LogAbsDet;

impl CustomOp1 for LogAbsDet {
    fn name(&self) -> &'static str {
        "log-abs-det"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, n) = host_matrix(storage, layout, self.name())?;
        let value = Lu::new(&a, n).map_err(candle::Error::Msg)?.log_abs_det();
        Ok((same_dtype(storage, vec![value]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // ∂ log|det A| / ∂A = A⁻ᵀ (Jacobi's formula).
        Ok(Some(inverse(arg)?.t()?.broadcast_mul(grad_res)?))
    }
}

/// The inverse of a square `f32` or `f64` matrix on any device, by an LU decomposition
/// with partial pivoting on the host; differentiable. A singular matrix is an error.
pub fn inverse(a: &Tensor) -> Result<Tensor> {
    on_host(a, MatrixInverse)
}

/// `log|det A|` of a square `f32` or `f64` matrix on any device, a scalar tensor, by an
/// LU decomposition with partial pivoting on the host; its gradient is `A⁻ᵀ`. A
/// singular matrix is an error.
pub fn log_abs_det(a: &Tensor) -> Result<Tensor> {
    on_host(a, LogAbsDet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                c[i * n + j] = (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn factors_rebuild_the_matrix() -> std::result::Result<(), String> {
        let n = 4;
        let a: Vec<f64> = (0..n * n)
            .map(|k| ((k * 7 + 3) % 11) as f64 - 5.0)
            .collect();
        let lu = Lu::new(&a, n)?;
        let [p, l, u] = lu.factors();
        let back = matmul(&p, &matmul(&l, &u, n), n);
        for (x, y) in a.iter().zip(&back) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        let id = matmul(&a, &lu.inverse(), n);
        for i in 0..n {
            for j in 0..n {
                let e = if i == j { 1.0 } else { 0.0 };
                assert!((id[i * n + j] - e).abs() < 1e-12);
            }
        }
        Ok(())
    }

    #[test]
    fn orthogonal_even_from_a_degenerate_matrix() {
        let n = 3;
        for a in [vec![1.0; n * n], vec![0.0; n * n]] {
            let q = orthogonal(&a, n);
            let qtq = matmul(
                &(0..n * n)
                    .map(|k| q[(k % n) * n + k / n])
                    .collect::<Vec<_>>(),
                &q,
                n,
            );
            for i in 0..n {
                for j in 0..n {
                    let e = if i == j { 1.0 } else { 0.0 };
                    assert!((qtq[i * n + j] - e).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn singular_is_an_error() {
        let err = Lu::new(&[1.0, 2.0, 2.0, 4.0], 2).expect_err("singular");
        assert_eq!(err, "the 2×2 matrix is singular or not finite");
    }
}
