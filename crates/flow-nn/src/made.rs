//! MADE (Germain et al. 2015): the masks that make a network autoregressive. With the
//! features ranked `1..=d` by an order, output parameters of a feature of rank `r` see
//! only the features of rank below `r` (and every context input).

use candle::{Device, Result, Tensor};

/// The 0/1 masks `(out, in)` of each layer of a network from `d` features (ranked by
/// `rank`, values `1..=d`) and `context` context inputs, through `hidden` widths, to
/// `params` outputs per feature laid out feature by feature. Hidden unit `j` of every
/// layer has degree `1 + j mod (d − 1)` (so every degree is present), and a unit sees
/// the units of the layer before whose degree is at most its own; an output of a
/// feature of rank `r` sees hidden units of degree below `r`.
pub fn made_masks(
    rank: &[usize],
    context: usize,
    hidden: &[usize],
    params: usize,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let d = rank.len();
    let inputs: Vec<usize> = rank
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0, context))
        .collect();
    let degrees = |width: usize| -> Vec<usize> {
        (0..width)
            .map(|j| 1 + j % d.saturating_sub(1).max(1))
            .collect()
    };
    let mut masks = Vec::new();
    let mut before = inputs;
    for &width in hidden {
        let after = degrees(width);
        masks.push(mask(&after, &before, |a, b| a >= b, device)?);
        before = after;
    }
    let outputs: Vec<usize> = rank
        .iter()
        .flat_map(|&r| std::iter::repeat_n(r, params))
        .collect();
    if hidden.is_empty() {
        // No hidden layer: each output sees the features ranked below its own.
        masks.push(mask(&outputs, &before, |o, i| o > i, device)?);
    } else {
        masks.push(mask(&outputs, &before, |o, h| o > h, device)?);
    }
    Ok(masks)
}

/// `m[j, i] = keep(after[j], before[i])`.
fn mask(
    after: &[usize],
    before: &[usize],
    keep: impl Fn(usize, usize) -> bool,
    device: &Device,
) -> Result<Tensor> {
    let keep = &keep;
    let v: Vec<f32> = after
        .iter()
        .flat_map(|&a| before.iter().map(move |&b| f32::from(u8::from(keep(a, b)))))
        .collect();
    Tensor::from_vec(v, (after.len(), before.len()), device)
}

/// Checks that `masks` (one per layer, `(out, in)`, as [`made_masks`] lays them out)
/// keep a network autoregressive in the order ranked by `rank`: no output of a feature
/// of rank `r` depends, through any path, on a feature of rank `r` or above (context
/// inputs may reach every output). `residual_blocks > 0` reads the masks as a residual
/// network's (input layer, two layers per block, output layer), whose blocks add their
/// input back. Masks that come from elsewhere (another library's MADE) are checked with
/// this before they are trusted: the one-pass log-det and the `d`-pass inverse need it.
pub fn check_made_masks(
    masks: &[Tensor],
    rank: &[usize],
    context: usize,
    params: usize,
    residual_blocks: usize,
) -> Result<()> {
    let d = rank.len();
    let inputs = d + context;
    // Which inputs each unit depends on, as bit sets.
    let words = inputs.div_ceil(64);
    let through = |m: &Tensor, before: &[Vec<u64>]| -> Result<Vec<Vec<u64>>> {
        let m = m.to_dtype(candle::DType::F32)?.to_vec2::<f32>()?;
        Ok(m.iter()
            .map(|row| {
                let mut set = vec![0u64; words];
                for (k, _) in row.iter().enumerate().filter(|(_, v)| **v != 0.0) {
                    if let Some(src) = before.get(k) {
                        set.iter_mut().zip(src).for_each(|(a, b)| *a |= b);
                    }
                }
                set
            })
            .collect())
    };
    let mut reach: Vec<Vec<u64>> = (0..inputs)
        .map(|i| {
            let mut set = vec![0u64; words];
            set[i / 64] |= 1 << (i % 64);
            set
        })
        .collect();
    if residual_blocks > 0 {
        if masks.len() != 2 + 2 * residual_blocks {
            candle::bail!(
                "{} MADE masks for a residual network of {residual_blocks} blocks",
                masks.len()
            );
        }
        reach = through(&masks[0], &reach)?;
        for pair in masks[1..masks.len() - 1].chunks_exact(2) {
            let inner = through(&pair[1], &through(&pair[0], &reach)?)?;
            for (a, b) in reach.iter_mut().zip(inner) {
                a.iter_mut().zip(b).for_each(|(x, y)| *x |= y);
            }
        }
        reach = through(&masks[masks.len() - 1], &reach)?;
    } else {
        for m in masks {
            reach = through(m, &reach)?;
        }
    }
    if reach.len() != d * params {
        candle::bail!(
            "the MADE masks give {} outputs, expected {}",
            reach.len(),
            d * params
        );
    }
    for (o, set) in reach.iter().enumerate() {
        let f = o / params;
        if let Some(i) = (0..d).find(|&i| set[i / 64] >> (i % 64) & 1 == 1 && rank[i] >= rank[f]) {
            candle::bail!(
                "the MADE masks let the parameters of feature {f} depend on feature {i}, \
                 which does not come before it in the order"
            );
        }
    }
    Ok(())
}
