//! Times the MPI backend's all-reduce: `mpirun -np 2 target/release/examples/all_reduce
//! [VALUES] [CALLS]` sums VALUES f32 values (default 153 056, the digits Glow's
//! parameters) CALLS times (default 200) after a barrier, and rank 0 prints the mean
//! time a call takes, the backend's thread hand-over and the host copies included.

use std::time::Instant;

use candle::{Device, Tensor};
use flow_dist::{connect, Backend, Launch};

fn main() -> candle::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let values = args.next().transpose().ok().flatten().unwrap_or(153_056);
    let calls = args.next().transpose().ok().flatten().unwrap_or(200).max(1);
    let c = connect(Launch::new(Backend::Mpi), &Device::Cpu)?;
    let t = Tensor::ones(values, candle::DType::F32, &Device::Cpu)?;
    // Warm up, then start together.
    c.all_reduce_sum(&t)?;
    c.barrier()?;
    let start = Instant::now();
    let mut sum = t.clone();
    for _ in 0..calls {
        sum = c.all_reduce_sum(&t)?;
    }
    let per_call = start.elapsed().as_secs_f64() / calls as f64;
    let first = sum.flatten_all()?.get(0)?.to_scalar::<f32>()?;
    if c.rank() == 0 {
        println!(
            "{} processes, {values} f32 values: {:.1} µs per all-reduce (each value summed to {first})",
            c.world(),
            per_call * 1e6
        );
    }
    Ok(())
}
