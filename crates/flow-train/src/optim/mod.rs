use candle::{Result, Tensor, Var};
use flow_kernels::adam::{step_all, steps_all_at_once, Step, Update};
use flow_kernels::{fused, Op};
use rayon::prelude::*;

use crate::{OptimizerConfig, OptimizerKind};

/// Adam / AdamW / Adamax over a fixed, ordered list of variables.
///
/// Its state (step count and both moment estimates) is exposed so that it can be saved
/// with a checkpoint and restored to resume a run exactly. For Adamax the second
/// "moment" is the infinity norm `u`.
///
/// Where `flow-kernels` has the in-place kernels (the CPU, f32/f64, fusion on: see
/// [`flow_kernels::fused`]), a step updates moments and parameters in place, allocating
/// nothing; elsewhere, or after [`with_in_place(false)`](Self::with_in_place), it runs
/// as candle tensor ops.
#[derive(Debug)]
pub struct Adam {
    cfg: OptimizerConfig,
    vars: Vec<Var>,
    /// First and second moments, one pair per variable, each with its own storage
    /// (the in-place kernels write them).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    in_place: bool,
}

/// Fresh zeros shaped like each variable.
fn zeros(vars: &[Var]) -> Result<Vec<Tensor>> {
    vars.iter().map(|v| v.zeros_like()).collect()
}

impl Adam {
    pub fn new(vars: Vec<Var>, cfg: OptimizerConfig) -> Result<Self> {
        Ok(Self {
            cfg,
            m: zeros(&vars)?,
            v: zeros(&vars)?,
            vars,
            step: 0,
            in_place: true,
        })
    }

    /// Whether CPU steps may use the in-place kernels (the default); `false` runs every
    /// step as tensor ops, the reference the kernels are tested against.
    pub fn with_in_place(mut self, enabled: bool) -> Self {
        self.in_place = enabled;
        self
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// `(first moments, second moments)`, in the order of [`vars`](Self::vars).
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores a state saved from an optimizer over the same variables.
    pub fn set_state(&mut self, step: usize, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            candle::bail!(
                "optimizer state for {} variables, expected {}",
                m.len(),
                self.vars.len()
            );
        }
        for ((var, m), v) in self.vars.iter().zip(&m).zip(&v) {
            if m.shape() != var.shape() || v.shape() != var.shape() {
                candle::bail!(
                    "optimizer state shape {:?} for a variable of shape {:?}",
                    m.shape(),
                    var.shape()
                );
            }
        }
        // Own copies: the in-place kernels must not write through to the caller's tensors.
        let own = |t: Vec<Tensor>| -> Result<Vec<Tensor>> {
            t.iter().map(|t| t.contiguous()?.copy()).collect()
        };
        self.step = step;
        self.m = own(m)?;
        self.v = own(v)?;
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars()[i]` (a missing
    /// gradient leaves that variable and its moments unchanged).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle::bail!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            );
        }
        for (g, var) in grads.iter().zip(&self.vars) {
            if let Some(g) = g.as_ref().filter(|g| g.shape() != var.shape()) {
                candle::bail!(
                    "gradient of shape {:?} for a variable of shape {:?}",
                    g.shape(),
                    var.shape()
                );
            }
        }
        let OptimizerConfig {
            kind,
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            ..
        } = self.cfg;
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let l2 = if kind == OptimizerKind::AdamW {
            0.0
        } else {
            wd
        };
        let update = Update {
            alpha: lr / c1,
            kappa: 1.0 / c2,
            eps,
            decay: if kind == OptimizerKind::AdamW {
                lr * wd
            } else {
                0.0
            },
            infinity_norm: kind == OptimizerKind::Adamax,
        };
        let step = Step {
            beta1: b1,
            beta2: b2,
            l2,
            update,
        };
        let kernel: Vec<bool> = self
            .vars
            .iter()
            .map(|v| self.in_place && fused(Op::Adam, v.as_tensor()))
            .collect();
        // On a GPU every variable with a gradient updates in one launch.
        let on_device: Vec<(usize, Tensor)> = (0..self.vars.len())
            .filter(|&i| kernel[i] && steps_all_at_once(self.vars[i].as_tensor()))
            .filter_map(|i| grads[i].as_ref().map(|g| (i, g)))
            .map(|(i, g)| Ok((i, g.contiguous()?)))
            .collect::<Result<_>>()?;
        let groups: Vec<[&Tensor; 4]> = on_device
            .iter()
            .map(|(i, g)| [self.vars[*i].as_tensor(), &self.m[*i], &self.v[*i], g])
            .collect();
        step_all(&step, &groups)?;
        // On the CPU the in-place kernels touch only their own variable and moments, so
        // the variables update in parallel.
        let fused_step = |i: usize| -> Result<()> {
            let Some(g) = &grads[i] else { return Ok(()) };
            let theta = self.vars[i].as_tensor();
            let g = g.contiguous()?;
            let (m, v) = (&self.m[i], &self.v[i]);
            m.inplace_op3(&g, theta, &step.first())?;
            v.inplace_op3(&g, theta, &step.second())?;
            theta.inplace_op3(m, v, &update)
        };
        (0..self.vars.len())
            .into_par_iter()
            .filter(|&i| kernel[i] && !steps_all_at_once(self.vars[i].as_tensor()))
            .try_for_each(fused_step)?;
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads[i].as_ref().filter(|_| !kernel[i]) else {
                continue;
            };
            let theta = var.as_tensor();
            let g = if l2 != 0.0 {
                (g + theta.affine(l2, 0.0)?)?
            } else {
                g.clone()
            };
            self.m[i] = (self.m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            if kind == OptimizerKind::Adamax {
                self.v[i] = self.v[i]
                    .affine(b2, 0.0)?
                    .maximum(&g.abs()?.affine(1.0, eps)?)?;
                let step = self.m[i].affine(update.alpha, 0.0)?.div(&self.v[i])?;
                var.set(&(theta - step)?)?;
                continue;
            }
            self.v[i] = (self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = self.v[i]
                .affine(update.kappa, 0.0)?
                .sqrt()?
                .affine(1.0, eps)?;
            let step = self.m[i].affine(update.alpha, 0.0)?.div(&denom)?;
            let base = theta.affine(1.0 - update.decay, 0.0)?;
            var.set(&(base - step)?)?;
        }
        Ok(())
    }
}
