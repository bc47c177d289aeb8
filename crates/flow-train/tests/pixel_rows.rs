//! Pixel rows held as bytes: image files whose values are all bytes load as bytes
//! (and as the same values in floats otherwise), the pixel checks read them, and
//! training on them is training on their values, bit for bit.

use std::{io::Write, path::PathBuf};

use anyhow::{ensure, Result};
use candle::{DType, Device};
use flow_glow::{GlowConfig, ImageShape};
use flow_models::ModelConfig;
use flow_train::{
    data::{check_pixels, digits, load_images, load_pixel_images, Dataset},
    fingerprint, Duration, Report, Reporter, TrainConfig, Trained, Trainer,
};

/// A fresh folder for one test's files.
fn temp_dir(test: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("flow-pixel-rows-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// An IDX file: magic, big-endian sizes, then the big-endian elements.
fn idx(kind: u8, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, kind, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(body);
    out
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}

#[test]
fn pixel_files_load_as_bytes_unless_a_value_is_not_one() -> Result<()> {
    let dir = temp_dir("load")?;
    // Three 2×3 images of bytes, gzipped as MNIST ships them.
    let body: Vec<u8> = (0..18).map(|i| (i * 15) as u8).collect();
    let path = dir.join("train-images-idx3-ubyte.gz");
    std::fs::write(&path, gzip(&idx(0x08, &[3, 2, 3], &body))?)?;
    let bytes = load_pixel_images(&path)?;
    ensure!(bytes.data.holds_pixels() && bytes.data.values.is_empty());
    ensure!(bytes.data.pixels == body, "{:?}", bytes.data.pixels);
    ensure!((bytes.data.len(), bytes.data.dim) == (3, 6));
    // The float loader reads the same values; both digest alike, so a run resumes on
    // either.
    let floats = load_images(&path)?;
    let widened: Vec<f32> = body.iter().map(|&b| f32::from(b)).collect();
    ensure!(floats.data.values == widened && !floats.data.holds_pixels());
    ensure!(fingerprint(&floats.data) == fingerprint(&bytes.data));
    ensure!(bytes.dims == floats.dims);

    // 16-bit pixels: bytes until the value 300, then floats, every value kept.
    let wide: Vec<i16> = vec![0, 255, 7, 300, 1, 2];
    let be: Vec<u8> = wide.iter().flat_map(|v| v.to_be_bytes()).collect();
    let path = dir.join("wide.idx");
    std::fs::write(&path, idx(0x0b, &[1, 2, 3], &be))?;
    let loaded = load_pixel_images(&path)?.data;
    let want: Vec<f32> = wide.iter().map(|&v| f32::from(v)).collect();
    ensure!(
        !loaded.holds_pixels() && loaded.values == want,
        "{loaded:?}"
    );

    // CSV rows of whole numbers in 0..=255 become bytes; a fraction keeps floats.
    let path = dir.join("rows.csv");
    std::fs::write(&path, "0,1,2,3\n255,4,5,6\n")?;
    let csv = load_pixel_images(&path)?.data;
    ensure!(csv.pixels == [0, 1, 2, 3, 255, 4, 5, 6], "{csv:?}");
    std::fs::write(&path, "0,1,2,3\n255,4,5,6.5\n")?;
    let csv = load_pixel_images(&path)?.data;
    ensure!(!csv.holds_pixels() && csv.values[7] == 6.5, "{csv:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn check_pixels_reads_bytes() -> Result<()> {
    let d = Dataset::from_pixels(3, vec![0, 1, 16, 2, 3, 17]);
    check_pixels(&d, 18, "ok")?;
    let e = match check_pixels(&d, 17, "pics") {
        Ok(()) => anyhow::bail!("17 passed as a pixel of 17 levels"),
        Err(e) => e.to_string(),
    };
    ensure!(
        e == "pics: row 2, column 3: 17 is not a pixel value (whole numbers 0 to 16)",
        "{e}"
    );
    Ok(())
}

struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Report) {}
}

fn all_weights(t: &Trained) -> Result<Vec<(String, Vec<f32>)>> {
    let data = t
        .varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut all: Vec<(String, Vec<f32>)> = data
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().flatten_all()?.to_vec1()?)))
        .collect::<candle::Result<_>>()?;
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all)
}

#[test]
fn training_on_bytes_is_training_on_their_values() -> Result<()> {
    let all = digits().data;
    let floats = Dataset::new(64, all.values[..200 * 64].to_vec());
    let bytes = floats.clone().into_pixels();
    ensure!(bytes.holds_pixels() && bytes.pixels.len() == 200 * 64);
    let glow = GlowConfig::new(ImageShape::new(1, 8, 8))
        .with_levels(2)
        .with_depth(1)
        .with_hidden_channels(8)
        .with_pixel_levels(17);
    let cfg = TrainConfig::new(ModelConfig::glow(&glow))
        .with_duration(Duration::Steps(6))
        .with_batch_size(50);
    let trainer = Trainer::new(cfg, &Device::Cpu)?.with_dtype(DType::F32);
    let a = trainer.fit(&floats, Some(&floats), &mut Silent)?;
    let b = trainer.fit(&bytes, Some(&bytes), &mut Silent)?;
    ensure!(all_weights(&a)? == all_weights(&b)?, "the weights differ");
    ensure!(a.summary.best_val_nll == b.summary.best_val_nll);
    ensure!(a.checkpoint.state.data_fingerprint == b.checkpoint.state.data_fingerprint);
    Ok(())
}
