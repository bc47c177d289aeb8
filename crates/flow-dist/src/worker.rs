//! A backend that runs on a thread of its own, so that every call can wait for the
//! other processes for a bounded time: the MPI and NCCL libraries block until every
//! process has called, and would wait for ever for one that died or hangs.

use std::{
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
        Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use candle::{Result, Tensor};

use crate::Collective;

/// What a backend does, on the thread that owns it.
pub(crate) trait Transport {
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor>;
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor>;
    fn barrier(&mut self) -> Result<()>;
}

enum Request {
    Sum(Tensor),
    Broadcast(Tensor, usize),
    Barrier,
}

type Reply = Result<Option<Tensor>>;

/// A [`Collective`] whose transport runs on its own thread; each call waits at most
/// `timeout` for its answer.
#[derive(Debug)]
pub(crate) struct Worker {
    name: &'static str,
    rank: usize,
    world: usize,
    timeout: Duration,
    line: Mutex<Line>,
}

#[derive(Debug)]
struct Line {
    requests: Option<Sender<Request>>,
    replies: Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
    /// Set when a call timed out: the transport's thread is stuck in that call.
    stalled: bool,
}

impl Worker {
    /// Starts the transport `open` makes (with this process's rank and the number of
    /// processes) on a thread of its own; `name` names the backend in errors.
    pub(crate) fn start<T, F>(name: &'static str, timeout: Duration, open: F) -> Result<Self>
    where
        T: Transport,
        F: FnOnce() -> Result<(usize, usize, T)> + Send + 'static,
    {
        let (request_tx, request_rx) = mpsc::channel::<Request>();
        let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
        let (opened_tx, opened_rx) = mpsc::channel::<Result<(usize, usize)>>();
        let thread = std::thread::Builder::new()
            .name(format!("flow-dist-{name}"))
            .spawn(move || {
                let mut transport = match open() {
                    Ok((rank, world, t)) => {
                        let _ = opened_tx.send(Ok((rank, world)));
                        t
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                for request in request_rx {
                    let reply = match request {
                        Request::Sum(t) => transport.all_reduce_sum(&t).map(Some),
                        Request::Broadcast(t, root) => transport.broadcast(&t, root).map(Some),
                        Request::Barrier => transport.barrier().map(|()| None),
                    };
                    if reply_tx.send(reply).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| candle::Error::Msg(format!("{name}: cannot start its thread: {e}")))?;
        let (rank, world) = match opened_rx.recv_timeout(timeout) {
            Ok(opened) => opened?,
            Err(_) => {
                return Err(candle::Error::Msg(format!(
                    "{name}: the processes did not all start within {} s",
                    timeout.as_secs_f64()
                )))
            }
        };
        Ok(Self {
            name,
            rank,
            world,
            timeout,
            line: Mutex::new(Line {
                requests: Some(request_tx),
                replies: reply_rx,
                thread: Some(thread),
                stalled: false,
            }),
        })
    }

    fn call(&self, request: Request, what: &str) -> Reply {
        let fail = |msg: String| candle::Error::Msg(msg);
        let mut line = self
            .line
            .lock()
            .map_err(|_| fail(format!("{}: poisoned", self.name)))?;
        if line.stalled {
            return Err(fail(format!(
                "rank {}: {} is stuck in an earlier call",
                self.rank, self.name
            )));
        }
        let sent = line.requests.as_ref().map(|tx| tx.send(request));
        if !matches!(sent, Some(Ok(()))) {
            return Err(fail(format!(
                "rank {}: {} has stopped",
                self.rank, self.name
            )));
        }
        match line.replies.recv_timeout(self.timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => {
                line.stalled = true;
                Err(fail(format!(
                    "rank {} of {}: no answer from the other processes within {} s in {what} ({}): one of them has died or hangs",
                    self.rank,
                    self.world,
                    self.timeout.as_secs_f64(),
                    self.name
                )))
            }
            Err(RecvTimeoutError::Disconnected) => Err(fail(format!(
                "rank {}: {} has stopped",
                self.rank, self.name
            ))),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let Ok(line) = self.line.get_mut() else {
            return;
        };
        // Closing the request channel ends the thread, which shuts the transport
        // down; one stuck in a call is left to end with the process.
        line.requests = None;
        if !line.stalled {
            if let Some(thread) = line.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl Collective for Worker {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.call(Request::Sum(t.clone()), "an all-reduce")?
            .ok_or_else(|| candle::Error::Msg("no sum".into()))
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            return Err(candle::Error::Msg(format!(
                "broadcast from rank {root} in a world of {}",
                self.world
            )));
        }
        self.call(Request::Broadcast(t.clone(), root), "a broadcast")?
            .ok_or_else(|| candle::Error::Msg("no broadcast value".into()))
    }
    fn barrier(&self) -> Result<()> {
        self.call(Request::Barrier, "a barrier").map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use candle::Device;

    use super::*;
    use crate::ThreadGroup;

    /// A transport over an in-process group, to exercise the worker without MPI.
    struct Threads(ThreadGroup);

    impl Transport for Threads {
        fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor> {
            self.0.all_reduce_sum(t)
        }
        fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor> {
            self.0.broadcast(t, root)
        }
        fn barrier(&mut self) -> Result<()> {
            self.0.barrier()
        }
    }

    fn workers(world: usize, timeout: Duration) -> Result<Vec<Worker>> {
        // The group itself waits longer than the workers, which must time out first.
        ThreadGroup::new(world, timeout * 20)
            .into_iter()
            .map(|member| {
                Worker::start("threads", timeout, move || {
                    Ok((member.rank(), member.world(), Threads(member)))
                })
            })
            .collect()
    }

    #[test]
    fn calls_pass_through_the_worker_thread() -> Result<()> {
        let ranks = workers(3, Duration::from_secs(30))?;
        let sums = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|w| {
                    s.spawn(move || -> Result<(Vec<f32>, Vec<f32>)> {
                        let r = w.rank() as f32;
                        let t = Tensor::new(&[r, 10.0 * r], &Device::Cpu)?;
                        let sum = w.all_reduce_sum(&t)?.to_vec1::<f32>()?;
                        w.barrier()?;
                        let b = w.broadcast(&t, 2)?.to_vec1::<f32>()?;
                        Ok((sum, b))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| candle::Error::Msg("panicked".into()))?
                })
                .collect::<Result<Vec<_>>>()
        })?;
        for (sum, b) in sums {
            assert_eq!(sum, [3.0, 30.0]);
            assert_eq!(b, [2.0, 20.0]);
        }
        Ok(())
    }

    #[test]
    fn a_rank_that_never_calls_makes_the_others_fail_within_the_timeout() -> Result<()> {
        let timeout = Duration::from_millis(300);
        let ranks = workers(2, timeout)?;
        let t = Tensor::new(&[1f32], &Device::Cpu)?;
        let Err(e) = ranks[0].all_reduce_sum(&t) else {
            panic!("a sum without the other rank returned");
        };
        assert_eq!(
            e.to_string(),
            "rank 0 of 2: no answer from the other processes within 0.3 s in an all-reduce (threads): one of them has died or hangs"
        );
        let Err(e) = ranks[0].barrier() else {
            panic!("a stuck worker took another call");
        };
        assert_eq!(e.to_string(), "rank 0: threads is stuck in an earlier call");
        Ok(())
    }
}
