//! FrEIA: `SequenceINN` of `GLOWCouplingBlock` (`module_list.{i}.subnet1/subnet2`)
//! and `PermuteRandom` (`module_list.{i}.perm`). A Glow block splits
//! `[x₁ | x₂]` (`x₁` as wide as `subnet1`'s input), then
//! `y₁ = x₁ ⊙ exp(c(s₂)) + t₂` with `[s₂ | t₂] = subnet2(x₂)` and
//! `y₂ = x₂ ⊙ exp(c(s₁)) + t₁` with `[s₁ | t₁] = subnet1(y₁)`, where
//! `c(s) = clamp · 0.636 · atan(s)` (clamp 2 by default): two affine couplings here.
//! Data → latent; base `N(0, I)`.

use std::collections::HashMap;

use flow_models::BaseConfig;
use flow_nn::{Nets, OutputLayout, ScaleMap};

use super::{affine, model, ImportOptions, Imported, LayerConfig, Source, Weights};
use crate::IoError;

/// FrEIA's default clamp of `GLOWCouplingBlock`.
pub(crate) const DEFAULT_CLAMP: f64 = 2.0;

pub(crate) fn import(w: &mut Weights, opts: &ImportOptions) -> Result<Imported, IoError> {
    let modules = w.children("module_list");
    if modules.is_empty() {
        return Err(w.invalid("no `module_list.{i}` tensors: not a FrEIA SequenceINN"));
    }
    let activation = opts
        .activation
        .unwrap_or(Source::Freia.default_activation());
    let scale = ScaleMap::Atan {
        clamp: opts.clamp.unwrap_or(DEFAULT_CLAMP),
    };
    let mut tensors = HashMap::new();
    let mut layers = Vec::new();
    let mut dim: Option<usize> = None;
    for i in modules {
        let p = format!("module_list.{i}");
        if w.contains(&format!("{p}.perm")) {
            let perm = w.indices(&format!("{p}.perm"))?;
            w.skip(&format!("{p}.perm_inv"));
            if *dim.get_or_insert(perm.len()) != perm.len() {
                return Err(w.invalid(format!(
                    "`{p}.perm` permutes {} features, not {}",
                    perm.len(),
                    dim.unwrap_or(0)
                )));
            }
            layers.push(LayerConfig::Permute { perm });
            continue;
        }
        if w.children(&format!("{p}.subnet1")).is_empty() {
            return Err(w.unsupported(
                &p,
                "only GLOWCouplingBlock and PermuteRandom modules are supported",
            ));
        }
        // Layer A transforms x₁ from x₂ (subnet2); layer B transforms x₂ from y₁ (subnet1).
        let (a, b) = (layers.len(), layers.len() + 1);
        let (net2, len2, out2) = w.mlp(
            &format!("{p}.subnet2"),
            &format!("layers.{a}.net"),
            activation,
            &mut tensors,
        )?;
        let (net1, len1, out1) = w.mlp(
            &format!("{p}.subnet1"),
            &format!("layers.{b}.net"),
            activation,
            &mut tensors,
        )?;
        let d = len1 + len2;
        if out2 != 2 * len1 || out1 != 2 * len2 {
            return Err(w.invalid(format!(
                "`{p}`: subnets map {len1} → {out1} and {len2} → {out2}; a Glow block needs {len1} → {} and {len2} → {}",
                2 * len2,
                2 * len1
            )));
        }
        if *dim.get_or_insert(d) != d {
            return Err(w.invalid(format!(
                "`{p}` works on {d} features, not {}",
                dim.unwrap_or(0)
            )));
        }
        let coupling = |mask: Vec<bool>, net| {
            affine(
                mask,
                Nets::Joint,
                OutputLayout::ScaleShift,
                net,
                scale,
                false,
            )
        };
        layers.push(coupling((0..d).map(|j| j >= len1).collect(), net2));
        layers.push(coupling((0..d).map(|j| j < len1).collect(), net1));
    }
    Ok(Imported::new(
        model(dim.unwrap_or(0), layers, BaseConfig::StandardNormal),
        tensors,
    ))
}
