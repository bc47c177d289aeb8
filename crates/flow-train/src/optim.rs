use candle::{Result, Tensor, Var};

use crate::{OptimizerConfig, OptimizerKind};

/// Adam / AdamW over a fixed, ordered list of variables.
///
/// Its state (step count and both moment estimates) is exposed so that it can be saved
/// with a checkpoint and restored to resume a run exactly.
#[derive(Debug)]
pub struct Adam {
    cfg: OptimizerConfig,
    vars: Vec<Var>,
    /// First and second moments, one pair per variable.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl Adam {
    pub fn new(vars: Vec<Var>, cfg: OptimizerConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            cfg,
            vars,
            m,
            v,
            step: 0,
        })
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
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars()[i]` (a missing
    /// gradient leaves that variable and its moments unchanged).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
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
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let theta = var.as_tensor();
            let g = if kind == OptimizerKind::Adam && wd != 0.0 {
                (g + theta.affine(wd, 0.0)?)?
            } else {
                g.clone()
            };
            self.m[i] = (self.m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            self.v[i] = (self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = self.v[i].affine(1.0 / c2, 0.0)?.sqrt()?.affine(1.0, eps)?;
            let update = self.m[i].affine(lr / c1, 0.0)?.div(&denom)?;
            let base = if kind == OptimizerKind::AdamW && wd != 0.0 {
                theta.affine(1.0 - lr * wd, 0.0)?
            } else {
                theta.clone()
            };
            var.set(&(base - update)?)?;
        }
        Ok(())
    }
}
