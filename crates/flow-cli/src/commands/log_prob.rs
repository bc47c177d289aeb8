use std::f64::consts::LN_2;

use crate::{
    cli::LogProbArgs,
    commands::{device, host_values, input_chunks, load_model, peak_memory_mib},
    output::{check_writable, CsvWriter},
    print_out, CmdResult,
};

pub fn run(a: LogProbArgs) -> CmdResult {
    if let Some(out) = &a.out {
        check_writable(out)?;
    }
    let device = device(&a.device)?;
    let model = load_model(&a.model, &device)?;
    let dim = model.flow.dim();
    let mut out = match &a.out {
        Some(p) => Some(CsvWriter::create(p, &["log_prob".to_string()])?),
        None => None,
    };
    let (mut rows, mut sum) = (0usize, 0f64);
    for input in input_chunks(&a.input, dim, model.checkpoint.config.context_dim)? {
        let input = input?;
        let x = input.x.to_device(&device)?;
        let context = input.context.map(|c| c.to_device(&device)).transpose()?;
        let lp = model.flow.log_prob_with_context(&x, context.as_ref())?;
        let values = host_values(&lp.detach().unsqueeze(1)?)?;
        rows += values.len();
        sum += values.iter().map(|v| *v as f64).sum::<f64>();
        if let Some(out) = out.as_mut() {
            out.rows(&values)?;
        }
    }
    if let Some(out) = out {
        out.commit()?;
    }
    let mean = sum / rows as f64;
    print_out(&format!(
        "{rows} rows  mean log-prob {mean:.4} nats  NLL {:.4} nats  {:.4} bits/dim\n",
        -mean,
        -mean / (dim as f64 * LN_2)
    ));
    if let Some(mib) = peak_memory_mib() {
        eprintln!("peak memory {mib:.0} MiB");
    }
    Ok(())
}
