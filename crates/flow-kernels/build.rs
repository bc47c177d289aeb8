//! With the `cuda` feature, compiles the fused kernels (`src/mlp/mlp.cu`,
//! `src/spline/spline.cu`, `src/affine/affine.cu`, `src/adam/adam.cu`,
//! `src/conv/conv.cu`, `src/actnorm/actnorm.cu`, `src/lu_weight/lu_weight.cu`) to PTX with
//! `nvcc`, as candle's own kernels are. `CUDA_COMPUTE_CAP` (e.g. `90`) picks the
//! virtual architecture; the default, 7.5, is the oldest CUDA 13 supports, and newer
//! GPUs compile the PTX for themselves when it loads.

use std::path::PathBuf;
use std::process::Command;

mod limits {
    include!("src/limits.rs");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/limits.rs");
    println!("cargo:rerun-if-changed=src/mlp/mlp.cu");
    println!("cargo:rerun-if-changed=src/spline/spline.cu");
    println!("cargo:rerun-if-changed=src/affine/affine.cu");
    println!("cargo:rerun-if-changed=src/adam/adam.cu");
    println!("cargo:rerun-if-changed=src/conv/conv.cu");
    println!("cargo:rerun-if-changed=src/actnorm/actnorm.cu");
    println!("cargo:rerun-if-changed=src/lu_weight/lu_weight.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var_os("NVCC").unwrap_or_else(|| "nvcc".into());
    for (source, ptx) in [
        ("src/mlp/mlp.cu", "fused_mlp.ptx"),
        ("src/spline/spline.cu", "fused_spline.ptx"),
        ("src/affine/affine.cu", "fused_affine.ptx"),
        ("src/adam/adam.cu", "fused_adam.ptx"),
        ("src/conv/conv.cu", "fused_conv.ptx"),
        ("src/actnorm/actnorm.cu", "fused_actnorm.ptx"),
        ("src/lu_weight/lu_weight.cu", "fused_lu_weight.ptx"),
    ] {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(format!("-DMAX_IO={}", limits::CUDA_MAX_IO))
            .arg(format!("-DMAX_BINS={}", limits::CUDA_MAX_BINS))
            .arg("-o")
            .arg(out.join(ptx))
            .arg(source)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on {source} ({s})"),
            Err(e) => {
                panic!("the cuda feature needs nvcc (the CUDA toolkit) on PATH or in $NVCC: {e}")
            }
        }
    }
}
