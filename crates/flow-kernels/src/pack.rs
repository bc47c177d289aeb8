//! `[W | b]`: a linear layer's weight `(out, in)` and bias `(out)` packed into the
//! `(out, in + 1)` layout the kernels read, flattened, as one op with its own backward
//! (on the graph, a `cat` of the weight and the unsqueezed bias, then a reshape, is
//! three ops, each with a backward that narrows or copies; every node costs its
//! bookkeeping twice a step).

use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

use crate::{on_host, slice};

#[derive(Debug, Clone, Copy)]
struct Pack;

fn rows_cols(w: &Layout, b: &Layout) -> Result<(usize, usize)> {
    let (rows, cols) = w.shape().dims2()?;
    if b.shape().dims() != [rows] {
        candle::bail!(
            "pack: bias {:?} does not match weight {:?}",
            b.shape(),
            w.shape()
        );
    }
    Ok((rows, cols))
}

fn pack<T: Copy>(w: &[T], b: &[T], cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(w.len() + b.len());
    for (j, &bias) in b.iter().enumerate() {
        out.extend_from_slice(&w[j * cols..(j + 1) * cols]);
        out.push(bias);
    }
    out
}

/// `(∂W, ∂b)` from the packed gradient, each laid out contiguously.
fn unpack<T: WithDType>(grad: &Tensor, rows: usize, cols: usize) -> Result<(Tensor, Tensor)> {
    let (gw, gb) = on_host(grad, |g: &[T]| {
        let mut gw = Vec::with_capacity(rows * cols);
        let mut gb = Vec::with_capacity(rows);
        for row in g.chunks_exact(cols + 1) {
            let (weights, bias) = row.split_at(cols);
            gw.extend_from_slice(weights);
            gb.push(bias[0]);
        }
        Ok((gw, gb))
    })?;
    let dev = grad.device();
    Ok((
        Tensor::from_vec(gw, (rows, cols), dev)?,
        Tensor::from_vec(gb, rows, dev)?,
    ))
}

impl CustomOp2 for Pack {
    fn name(&self) -> &'static str {
        "pack-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = rows_cols(l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(pack(slice(w, l1)?, slice(b, l2)?, cols))
            }
            (CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(pack(slice(w, l1)?, slice(b, l2)?, cols))
            }
            _ => candle::bail!("pack supports f32 and f64 tensors of one dtype"),
        };
        Ok((out, Shape::from(rows * (cols + 1))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, cols) = rows_cols(w.layout(), b.layout())?;
        let (gw, gb) = match w.dtype() {
            candle::DType::F32 => unpack::<f32>(grad, rows, cols)?,
            candle::DType::F64 => unpack::<f64>(grad, rows, cols)?,
            other => candle::bail!("pack has no backward for {other:?}"),
        };
        Ok((Some(gw), Some(gb)))
    }
}

/// `[W | b]` `(out, in + 1)` flattened to `(out · (in + 1),)`: one op on the CPU, `cat`
/// and a reshape elsewhere.
pub fn pack_linear(w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if w.device().is_cpu() && w.is_contiguous() && b.is_contiguous() {
        w.apply_op2(b, Pack)
    } else {
        Tensor::cat(&[w, &b.unsqueeze(1)?], 1)?.flatten_all()
    }
}
