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
