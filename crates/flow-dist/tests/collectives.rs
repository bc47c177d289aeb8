//! The collectives without a network: the in-process group's sums, broadcasts and
//! barriers, the differentiable sum over ranks against its analytic gradient, many
//! tensors in one call, checksums, the launchers' variables, and the TCP hand-over of
//! NCCL's id on the loopback interface.

use std::{sync::Arc, time::Duration};

use anyhow::{anyhow, ensure, Result};
use candle::{DType, Device, Tensor, Var};
use flow_dist::{
    all_reduce_tensors, broadcast_tensors, checksum, receive_id, replicated_sum, serve_id, Backend,
    Collective, LauncherVars, Single, ThreadGroup,
};

const PATIENCE: Duration = Duration::from_secs(60);

/// Runs `f` on every rank of an in-process group of `world`, each on its thread.
fn on_ranks<T: Send>(
    world: usize,
    f: impl Fn(Arc<dyn Collective>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(world, PATIENCE)
            .into_iter()
            .map(|member| {
                let f = &f;
                s.spawn(move || f(Arc::new(member)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a rank panicked"))?)
            .collect()
    })
}

#[test]
fn a_group_sums_broadcasts_and_meets() -> Result<()> {
    let out = on_ranks(3, |c| {
        let r = c.rank() as f64;
        let t = Tensor::new(&[[r, 1.0], [r * r, -r]], &Device::Cpu)?;
        let sum = c.all_reduce_sum(&t)?.to_vec2::<f64>()?;
        c.barrier()?;
        let from_1 = c.broadcast(&t, 1)?.to_vec2::<f64>()?;
        Ok((sum, from_1))
    })?;
    for (sum, from_1) in out {
        ensure!(sum == [[3.0, 3.0], [5.0, -3.0]], "{sum:?}");
        ensure!(from_1 == [[1.0, 1.0], [1.0, -1.0]], "{from_1:?}");
    }
    Ok(())
}

#[test]
fn ranks_that_call_different_operations_fail_instead_of_mixing_them() -> Result<()> {
    let out = on_ranks(2, |c| {
        let t = Tensor::new(&[1f32], &Device::Cpu)?;
        Ok(match c.rank() {
            0 => c.all_reduce_sum(&t).map(|_| ()),
            _ => c.broadcast(&t, 0).map(|_| ()),
        })
    })?;
    // Whichever rank came second sees the mismatch; the first is told of it.
    let errors: Vec<String> = out
        .into_iter()
        .map(|r| r.err().map(|e| e.to_string()).unwrap_or_default())
        .collect();
    ensure!(
        errors
            .iter()
            .all(|e| e.contains("called") && e.contains("while the others called")),
        "{errors:?}"
    );
    Ok(())
}

#[test]
fn a_world_of_one_returns_its_input() -> Result<()> {
    let t = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
    ensure!(Single.all_reduce_sum(&t)?.to_vec1::<f32>()? == [1.0, 2.0]);
    Single.barrier()?;
    let Err(e) = Single.broadcast(&t, 1) else {
        return Err(anyhow!("broadcast from a rank that does not exist"));
    };
    ensure!(e.to_string() == "broadcast from rank 1 in a world of one process");
    Ok(())
}

/// `L = Σ_r L_r` with `L_r = Σ_i w_r,i·s_i²` and `s = Σ_r a_r·x_r` (the sum over the
/// ranks), so `∂L/∂x_r = 2·a_r·s·Σ_r' w_r'`: each rank's gradient needs every
/// rank's weights, which only the backward pass's own sum brings.
#[test]
fn the_sum_over_ranks_passes_the_summed_gradient_back() -> Result<()> {
    let world = 3;
    let x = [1.0f64, -2.0, 0.5];
    let grads = on_ranks(world, |c| {
        let r = c.rank() as f64;
        let x = Var::new(&x, &Device::Cpu)?;
        let a = r + 1.0;
        let w = Tensor::new(&[r, 1.0, 2.0 * r], &Device::Cpu)?;
        let s = replicated_sum(&c, &x.as_tensor().affine(a, 0.0)?)?;
        let loss = (s.sqr()? * w)?.sum_all()?;
        let g = loss.backward()?;
        let gx = g.get(x.as_tensor()).ok_or_else(|| anyhow!("no gradient"))?;
        Ok(gx.to_vec1::<f64>()?)
    })?;
    let s_total: f64 = (1..=world).map(|a| a as f64).sum(); // s = Σ a_r · x
    let w_total = [0.0 + 1.0 + 2.0, 3.0, 2.0 * (0.0 + 1.0 + 2.0)];
    for (r, g) in grads.iter().enumerate() {
        let a = r as f64 + 1.0;
        for i in 0..3 {
            let want = 2.0 * a * s_total * x[i] * w_total[i];
            ensure!(
                (g[i] - want).abs() < 1e-9,
                "rank {r}, {i}: {} vs {want}",
                g[i]
            );
        }
    }
    Ok(())
}

#[test]
fn many_tensors_travel_in_one_call_and_come_back_in_their_shapes() -> Result<()> {
    let out = on_ranks(2, |c| {
        let r = c.rank() as f32;
        let ts = [
            Tensor::new(&[[r, 2.0], [3.0, 4.0]], &Device::Cpu)?,
            Tensor::new(&[10.0 * r], &Device::Cpu)?,
            Tensor::new(&[r as u32 + 7], &Device::Cpu)?, // another dtype: its own call
        ];
        let sums = all_reduce_tensors(c.as_ref(), &ts)?;
        let lead = broadcast_tensors(c.as_ref(), &ts, 0)?;
        Ok((
            sums[0].to_vec2::<f32>()?,
            sums[1].to_vec1::<f32>()?,
            sums[2].to_vec1::<u32>()?,
            lead[1].to_vec1::<f32>()?,
            lead[2].to_vec1::<u32>()?,
        ))
    })?;
    for o in out {
        ensure!(o.0 == [[1.0, 4.0], [6.0, 8.0]] && o.1 == [10.0] && o.2 == [15]);
        ensure!(o.3 == [0.0] && o.4 == [7]);
    }
    Ok(())
}

#[test]
fn a_checksum_sees_one_changed_bit_and_the_shape() -> Result<()> {
    let dev = Device::Cpu;
    let a = Tensor::new(&[1.0f32, 2.0, 3.0, 4.0], &dev)?;
    let same = checksum(std::slice::from_ref(&a))?;
    ensure!(checksum(&[a.copy()?])? == same);
    let nudged = f32::from_bits(4.0f32.to_bits() + 1);
    ensure!(checksum(&[Tensor::new(&[1.0f32, 2.0, 3.0, nudged], &dev)?])? != same);
    ensure!(checksum(&[a.reshape((2, 2))?])? != same);
    ensure!(checksum(&[a.to_dtype(DType::F64)?])? != same);
    Ok(())
}

#[test]
fn the_launchers_variables_give_rank_world_and_local_rank() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        LauncherVars::from_lookup(|name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    };
    let place = |rank, world, local_rank| LauncherVars {
        rank,
        world,
        local_rank,
    };
    assert_eq!(vars(&[]), Ok(place(0, 1, 0)));
    assert_eq!(
        vars(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")]),
        Ok(place(3, 8, 1))
    );
    assert_eq!(
        vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "6"),
            ("SLURM_LOCALID", "2")
        ]),
        Ok(place(5, 6, 2))
    );
    // Open MPI's, without a local rank: the rank stands in.
    assert_eq!(
        vars(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]),
        Ok(place(1, 2, 1))
    );
    assert_eq!(
        vars(&[("RANK", "2"), ("WORLD_SIZE", "2")]),
        Err("RANK=2 and WORLD_SIZE=2 from the launcher: the rank must lie below the number of processes".into())
    );
    assert_eq!(
        vars(&[("RANK", "0")]),
        Err("RANK is set but WORLD_SIZE is not: the launcher sets both".into())
    );
    assert_eq!(
        vars(&[("RANK", "x"), ("WORLD_SIZE", "2")]),
        Err("RANK=`x` from the launcher is not a whole number".into())
    );
}

#[test]
fn backends_name_their_features() {
    assert_eq!(Backend::from_name("mpi"), Some(Backend::Mpi));
    assert_eq!(Backend::from_name("gloo"), None);
    assert_eq!(Backend::Mpi.built(), cfg!(feature = "mpi"));
    assert_eq!(
        Backend::Nccl.unavailable().is_some(),
        !cfg!(feature = "nccl")
    );
}

#[test]
fn rank_0_hands_its_id_to_every_other_rank_over_tcp() -> Result<()> {
    // A free port on the loopback interface.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let id: Vec<u8> = (0..128u8).map(|b| b.wrapping_mul(37)).collect();
    let got = std::thread::scope(|s| {
        // The others may come before rank 0 listens: they try again.
        let others: Vec<_> = (0..3)
            .map(|_| s.spawn(|| receive_id(&addr, 128, PATIENCE)))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        serve_id(&addr, 3, &id, PATIENCE).map_err(|e| anyhow!(e))?;
        others
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("panicked"))?
                    .map_err(|e| anyhow!(e))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    ensure!(got.iter().all(|g| *g == id));
    // Nobody serves: a bounded wait and an error that says so.
    let Err(e) = receive_id(&addr, 128, Duration::from_millis(200)) else {
        return Err(anyhow!("received an id nobody served"));
    };
    ensure!(
        e.starts_with(&format!("rank 0 did not answer at {addr} within 0.2 s")),
        "{e}"
    );
    Ok(())
}
