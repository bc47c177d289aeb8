//! `flow export`: a model in another tool's layout.

use flow_io::Target;

use crate::{
    cli::{ExportArgs, TargetArg},
    output::{check_distinct, check_writable, Format},
    print_out, CmdResult,
};

pub fn run(a: ExportArgs) -> CmdResult {
    Format::of(&a.out, "--out", &[Format::Safetensors])?;
    check_writable(&a.out)?;
    check_distinct("--out", &a.out, &[("--model", &a.model)])?;
    let ck = flow_io::load(&a.model)?;
    let loaded = flow_io::build_checked(&a.model, ck, candle::DType::F32, &candle::Device::Cpu)?;
    let context_dim = loaded.checkpoint.config.context_dim;
    flow_io::check_scores(&a.model, &loaded.flow, context_dim)?;
    let target = match a.to {
        TargetArg::Seed => Target::Seed,
        TargetArg::Zuko => Target::Zuko,
    };
    let checkpoint = &loaded.checkpoint;
    let loading = flow_io::export(target, &a.out, &checkpoint.config, &checkpoint.tensors)?;
    eprintln!("wrote {}; to load it:", a.out.display());
    print_out(&format!("{loading}\n"));
    Ok(())
}
