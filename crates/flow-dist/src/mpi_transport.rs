//! The MPI backend: the system's MPI library through the `mpi` crate.

use candle::{DType, Result, Tensor};
use mpi::{
    collective::SystemOperation,
    environment::Universe,
    topology::SimpleCommunicator,
    traits::{Communicator, CommunicatorCollectives, Root},
    Threading,
};

use crate::worker::Transport;

/// MPI's world communicator; MPI is shut down when it is dropped.
pub(crate) struct MpiTransport {
    world: SimpleCommunicator,
    // Dropped last: finalises MPI.
    _universe: Universe,
}

/// Starts MPI on the calling thread, the only one that calls it afterwards.
pub(crate) fn open() -> Result<(usize, usize, MpiTransport)> {
    let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
        .ok_or_else(|| candle::Error::Msg("MPI was started already".into()))?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    Ok((
        rank,
        size,
        MpiTransport {
            world,
            _universe: universe,
        },
    ))
}

/// Runs `$body` with `$v` bound to `$t`'s values as a host `Vec` of its element type
/// and `$ty` to that type, for the dtypes MPI has an equivalent of.
macro_rules! with_host_values {
    ($t:expr, |$v:ident: $ty:ident| $body:expr) => {{
        let flat = $t.flatten_all()?;
        match flat.dtype() {
            DType::F32 => {
                type $ty = f32;
                let $v = flat.to_vec1::<f32>()?;
                $body
            }
            DType::F64 => {
                type $ty = f64;
                let $v = flat.to_vec1::<f64>()?;
                $body
            }
            DType::U32 => {
                type $ty = u32;
                let $v = flat.to_vec1::<u32>()?;
                $body
            }
            DType::I64 => {
                type $ty = i64;
                let $v = flat.to_vec1::<i64>()?;
                $body
            }
            DType::U8 => {
                type $ty = u8;
                let $v = flat.to_vec1::<u8>()?;
                $body
            }
            other => Err(candle::Error::Msg(format!(
                "MPI carries f32, f64, u32, i64 and u8 tensors, not {other:?}"
            ))),
        }
    }};
}

impl Transport for MpiTransport {
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        with_host_values!(t, |values: T| {
            let mut sum: Vec<T> = vec![T::default(); values.len()];
            self.world
                .all_reduce_into(&values[..], &mut sum[..], SystemOperation::sum());
            Tensor::from_vec(sum, t.shape(), t.device())
        })
    }

    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor> {
        with_host_values!(t, |values: T| {
            let mut values: Vec<T> = values;
            self.world
                .process_at_rank(root as i32)
                .broadcast_into(&mut values[..]);
            Tensor::from_vec(values, t.shape(), t.device())
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
}
