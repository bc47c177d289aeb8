use candle::{DType, Result, Tensor};

/// A 64-bit digest of the tensors' dtypes, shapes and exact values (bit patterns), in
/// order: equal on two processes exactly when, barring a collision, they hold the
/// same tensors bit for bit. For checking that data-parallel replicas have not
/// drifted apart.
pub fn checksum(tensors: &[Tensor]) -> Result<u64> {
    // FNV-1a over 64-bit words.
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |word: u64| h = (h ^ word).wrapping_mul(PRIME);
    for t in tensors {
        mix(t.dtype() as u64);
        for &d in t.dims() {
            mix(d as u64);
        }
        let flat = t.flatten_all()?;
        match t.dtype() {
            DType::F32 => flat
                .to_vec1::<f32>()?
                .iter()
                .for_each(|v| mix(u64::from(v.to_bits()))),
            DType::F64 => flat.to_vec1::<f64>()?.iter().for_each(|v| mix(v.to_bits())),
            DType::U32 => flat
                .to_vec1::<u32>()?
                .iter()
                .for_each(|&v| mix(u64::from(v))),
            DType::I64 => flat.to_vec1::<i64>()?.iter().for_each(|&v| mix(v as u64)),
            DType::U8 => flat
                .to_vec1::<u8>()?
                .iter()
                .for_each(|&v| mix(u64::from(v))),
            // Half precision: through f32, which holds every value exactly.
            _ => flat
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .for_each(|v| mix(u64::from(v.to_bits()))),
        }
    }
    Ok(h)
}
