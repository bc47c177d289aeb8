//! The README's shell examples, run as written: every fenced `sh` block, top to bottom,
//! in one fresh folder (a later block may read what an earlier one wrote, as a reader
//! following along would), with the `flow` under test first on the `PATH`.
//!
//! Lines that run `cargo` build and test this repository itself; they are left out, since
//! this test is what they build.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The README at the workspace root.
fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    std::fs::read_to_string(&path).expect("README.md")
}

/// A fenced block: the line its fence opens on (1-based) and its lines.
struct Block {
    line: usize,
    lines: Vec<String>,
}

/// The fenced blocks whose info string names a shell (`sh`, `bash`, `shell`).
fn shell_blocks(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(Block, bool)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (fence, open.take()) {
            (Some(_), Some((block, shell))) => {
                if shell {
                    blocks.push(block);
                }
            }
            (Some(info), None) => {
                let lang = info.split_whitespace().next().unwrap_or("");
                let shell = matches!(lang, "sh" | "bash" | "shell");
                open = Some((
                    Block {
                        line: i + 1,
                        lines: Vec::new(),
                    },
                    shell,
                ));
            }
            (None, Some((mut block, shell))) => {
                block.lines.push(line.to_string());
                open = Some((block, shell));
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "README.md: a fenced block is never closed");
    blocks
}

/// A block's commands, without those that run `cargo`.
fn script(block: &Block) -> String {
    block
        .lines
        .iter()
        .filter(|l| !l.trim_start().starts_with("cargo "))
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

fn workdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn the_first_lines_give_the_two_commands_and_usage_follows_within_40_lines() {
    let text = readme();
    let blocks = shell_blocks(&text);
    let first = blocks.first().expect("a shell block");
    assert!(
        first.line <= 12,
        "the first shell block opens on line {}",
        first.line
    );
    let body = first.lines.join("\n");
    assert!(body.contains("cargo xtask train"), "{body}");
    assert!(body.contains("cargo test --release --workspace"), "{body}");
    let usage = blocks
        .iter()
        .find(|b| b.lines.iter().any(|l| l.trim_start().starts_with("flow ")))
        .expect("a block of `flow` commands");
    assert!(
        usage.line <= 40,
        "the first `flow` example opens on line {}",
        usage.line
    );
    // The test command the README gives is the one CI runs.
    let ci = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/run"))
        .expect(".ci/run");
    assert!(ci.contains("cargo test --release --workspace"), "{ci}");
}

#[test]
fn every_shell_block_runs_as_written() {
    let text = readme();
    let blocks = shell_blocks(&text);
    assert!(blocks.len() >= 3, "only {} shell blocks", blocks.len());
    let dir = workdir();
    let bin = Path::new(env!("CARGO_BIN_EXE_flow"))
        .parent()
        .expect("the binary's folder")
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    for block in &blocks {
        let script = script(block);
        if script.trim().is_empty() {
            continue;
        }
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(&dir)
            .env("PATH", &path)
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "README.md line {}: the block failed ({}):\n{script}\n--- stderr:\n{}",
            block.line,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
