use std::f64::consts::LN_2;

use crate::{
    cli::LogProbArgs,
    commands::{device, host_values, load_input, load_model},
    output::{check_writable, write_csv},
    print_out, CmdResult,
};

pub fn run(a: LogProbArgs) -> CmdResult {
    if let Some(out) = &a.out {
        check_writable(out)?;
    }
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    let input = load_input(&a.input, dim, model.checkpoint.config.context_dim)?;
    let rows = input.data.len();
    let mut values = Vec::with_capacity(rows);
    let chunk = 16_384;
    let mut start = 0;
    while start < rows {
        let len = chunk.min(rows - start);
        let xb = input.x.narrow(0, start, len)?.to_device(&device)?;
        let cb = match &input.context {
            Some(c) => Some(c.narrow(0, start, len)?.to_device(&device)?),
            None => None,
        };
        let lp = model.flow.log_prob_with_context(&xb, cb.as_ref())?;
        values.extend(host_values(&lp.detach().unsqueeze(1)?)?);
        start += len;
    }
    let mean = values.iter().map(|v| *v as f64).sum::<f64>() / values.len() as f64;
    if let Some(out) = &a.out {
        write_csv(out, &["log_prob".to_string()], &values, 1)?;
    }
    print_out(&format!(
        "{} rows  mean log-prob {mean:.4} nats  NLL {:.4} nats  {:.4} bits/dim\n",
        values.len(),
        -mean,
        -mean / (dim as f64 * LN_2)
    ));
    Ok(())
}
