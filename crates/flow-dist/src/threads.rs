//! Ranks that are threads of one process.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use candle::{Result, Tensor};

use crate::Collective;

/// One rank of a group whose ranks are threads of this process: the arithmetic of a
/// data-parallel run without a launcher or a network, for tests and for library
/// users. Sums add the ranks' tensors in rank order. A call waits at most the
/// group's timeout for the other ranks; then it, and every later call of any rank,
/// fails.
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    done: Condvar,
}

/// The operation a rank called, which every rank of a round must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Sum,
    Broadcast(usize),
    Barrier,
}

/// The collective call in progress, and the outcome of the last one.
#[derive(Debug, Default)]
struct Round {
    /// Counts finished calls: a waiting rank is done when it moves on.
    generation: u64,
    op: Option<Op>,
    inputs: Vec<Option<Tensor>>,
    arrived: usize,
    outcome: Option<std::result::Result<Option<Tensor>, String>>,
    /// Set by a timeout or a mismatched call: the group is unusable.
    broken: Option<String>,
}

impl ThreadGroup {
    /// A group of `world` ranks: the members, in rank order, each to be moved to a
    /// thread of its own. A call waits at most `timeout` for the others.
    pub fn new(world: usize, timeout: Duration) -> Vec<Self> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            round: Mutex::new(Round {
                inputs: vec![None; world],
                ..Round::default()
            }),
            done: Condvar::new(),
        });
        (0..world)
            .map(|rank| Self {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn meet(&self, op: Op, input: Option<Tensor>) -> Result<Option<Tensor>> {
        let s = &self.shared;
        let fail = |msg: String| candle::Error::Msg(msg);
        let mut round = s
            .round
            .lock()
            .map_err(|_| fail("thread group poisoned".into()))?;
        if let Some(why) = &round.broken {
            return Err(fail(why.clone()));
        }
        match round.op {
            None => round.op = Some(op),
            Some(other) if other != op => {
                let why = format!(
                    "rank {} called {op:?} while the others called {other:?}",
                    self.rank
                );
                round.broken = Some(why.clone());
                s.done.notify_all();
                return Err(fail(why));
            }
            Some(_) => {}
        }
        round.inputs[self.rank] = input;
        round.arrived += 1;
        let generation = round.generation;
        if round.arrived == s.world {
            let inputs: Vec<Option<Tensor>> = round.inputs.iter_mut().map(Option::take).collect();
            round.outcome = Some(combine(op, inputs).map_err(|e| e.to_string()));
            round.generation += 1;
            round.arrived = 0;
            round.op = None;
            s.done.notify_all();
        } else {
            let deadline = Instant::now() + s.timeout;
            while round.generation == generation && round.broken.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let why = format!(
                        "rank {} of {}: the other ranks did not reach the {op:?} within {:?}",
                        self.rank, s.world, s.timeout
                    );
                    round.broken = Some(why.clone());
                    s.done.notify_all();
                    return Err(fail(why));
                }
                round = s
                    .done
                    .wait_timeout(round, left)
                    .map_err(|_| fail("thread group poisoned".into()))?
                    .0;
            }
            if round.generation == generation {
                return Err(fail(round.broken.clone().unwrap_or_default()));
            }
        }
        match round.outcome.clone() {
            // Each rank gets tensors of its own, as from a network.
            Some(Ok(t)) => t.map(|t| t.copy()).transpose(),
            Some(Err(e)) => Err(fail(e)),
            None => Err(fail("no outcome".into())),
        }
    }
}

/// The outcome of a round from the ranks' inputs, in rank order.
fn combine(op: Op, inputs: Vec<Option<Tensor>>) -> Result<Option<Tensor>> {
    match op {
        Op::Barrier => Ok(None),
        Op::Broadcast(root) => Ok(inputs.into_iter().nth(root).flatten()),
        Op::Sum => {
            let mut each = inputs.into_iter().flatten();
            let Some(first) = each.next() else {
                return Ok(None);
            };
            each.try_fold(first, |sum, t| sum + t).map(Some)
        }
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let sum = self.meet(Op::Sum, Some(t.clone()))?;
        sum.ok_or_else(|| candle::Error::Msg("sum of nothing".into()))
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.world {
            return Err(candle::Error::Msg(format!(
                "broadcast from rank {root} in a world of {}",
                self.shared.world
            )));
        }
        let value = self.meet(Op::Broadcast(root), Some(t.clone()))?;
        value.ok_or_else(|| candle::Error::Msg("broadcast of nothing".into()))
    }
    fn barrier(&self) -> Result<()> {
        self.meet(Op::Barrier, None).map(|_| ())
    }
}
