//! A source state dict: tensors looked up by name, with every name that is read
//! remembered, so that unexpected names can be reported.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use candle::Tensor;
use flow_nn::{Activation, NetConfig};
use safetensors::{Dtype, SafeTensors};

use crate::{checkpoint::to_tensor, IoError};

pub(crate) struct Weights<'a> {
    path: PathBuf,
    st: SafeTensors<'a>,
    unused: BTreeSet<String>,
}

impl<'a> Weights<'a> {
    pub fn parse(path: &Path, bytes: &'a [u8]) -> Result<Self, IoError> {
        let st = crate::checkpoint::parse_safetensors(path, bytes)?;
        let unused = st.names().into_iter().map(String::from).collect();
        Ok(Self {
            path: path.to_path_buf(),
            st,
            unused,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn invalid(&self, message: impl Into<String>) -> IoError {
        IoError::Invalid {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// An error naming the first tensor under `prefix`: a module the importer does not
    /// support, with `why`.
    pub fn unsupported(&self, prefix: &str, why: &str) -> IoError {
        let p = format!("{prefix}.");
        let name = self
            .names()
            .into_iter()
            .find(|k| k.starts_with(&p))
            .unwrap_or(prefix.to_string());
        self.invalid(format!("`{name}`: {why}"))
    }

    /// Every name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.st.names().into_iter().map(String::from).collect();
        n.sort();
        n
    }

    pub fn contains(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    fn view(&mut self, name: &str) -> Result<safetensors::tensor::TensorView<'a>, IoError> {
        let v = self.st.tensor(name).map_err(|_| IoError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        self.unused.remove(name);
        Ok(v)
    }

    /// A float tensor (f16, bf16, f32 or f64) as f32, with the expected shape.
    pub fn float(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, IoError> {
        let t = self.float_any(name)?;
        if t.dims() != shape {
            return Err(IoError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// A float tensor of any shape, as f32; NaN or infinite values are an error naming
    /// the tensor.
    pub fn float_any(&mut self, name: &str) -> Result<Tensor, IoError> {
        let v = self.view(name)?;
        let t = to_tensor(&self.path, name, &v)?
            .to_dtype(candle::DType::F32)
            .map_err(crate::IoError::candle(&self.path))?;
        let values = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(crate::IoError::candle(&self.path))?;
        if !values.iter().all(|v| v.is_finite()) {
            return Err(IoError::NonFinite {
                path: self.path.clone(),
                name: name.to_string(),
            });
        }
        Ok(t)
    }

    /// The shape of a tensor, without marking it as read.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, IoError> {
        self.st
            .tensor(name)
            .map(|v| v.shape().to_vec())
            .map_err(|_| IoError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// An integer buffer (any integer dtype) as indices.
    pub fn indices(&mut self, name: &str) -> Result<Vec<usize>, IoError> {
        let v = self.view(name)?;
        let data = v.data();
        let bad = |path: &Path| IoError::BadDtype {
            path: path.to_path_buf(),
            name: name.to_string(),
            dtype: format!("{:?}", v.dtype()),
        };
        let values: Vec<i64> = match v.dtype() {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
                .collect(),
            Dtype::U8 => data.iter().map(|&b| b as i64).collect(),
            _ => return Err(bad(&self.path)),
        };
        values
            .into_iter()
            .map(|i| {
                usize::try_from(i)
                    .map_err(|_| self.invalid(format!("`{name}` holds a negative index {i}")))
            })
            .collect()
    }

    /// A boolean buffer (candle cannot read these; the bytes are 0 or 1).
    pub fn bools(&mut self, name: &str) -> Result<Vec<bool>, IoError> {
        let v = self.view(name)?;
        match v.dtype() {
            Dtype::BOOL | Dtype::U8 => Ok(v.data().iter().map(|&b| b != 0).collect()),
            other => Err(IoError::BadDtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// A MADE mask `(out, in)` (boolean, integer 0/1 or float 0/1, as the libraries save
    /// them) as an f32 tensor of zeros and ones.
    pub fn mask(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, IoError> {
        let found = self.shape(name)?;
        if found != shape {
            return Err(IoError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        let values: Vec<f32> = match self.st.tensor(name).map(|v| v.dtype()) {
            Ok(Dtype::BOOL | Dtype::U8) => self
                .bools(name)?
                .into_iter()
                .map(|b| f32::from(u8::from(b)))
                .collect(),
            _ => self
                .float_any(name)?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(IoError::candle(&self.path))?,
        };
        if values.iter().any(|v| *v != 0.0 && *v != 1.0) {
            return Err(self.invalid(format!("`{name}` is not a mask of zeros and ones")));
        }
        Tensor::from_vec(values, shape, &candle::Device::Cpu).map_err(IoError::candle(&self.path))
    }

    /// Marks a tensor as read without using it (buffers that are derived data).
    pub fn skip(&mut self, name: &str) {
        self.unused.remove(name);
    }

    /// Numeric children of `prefix`: for `prefix = "a.b"`, the sorted `n` of every
    /// `a.b.{n}.…` name.
    pub fn children(&self, prefix: &str) -> Vec<usize> {
        let p = format!("{prefix}.");
        let set: BTreeSet<usize> = self
            .st
            .names()
            .into_iter()
            .filter_map(|n| n.strip_prefix(&p)?.split('.').next()?.parse().ok())
            .collect();
        set.into_iter().collect()
    }

    /// Reads a plain MLP whose Linear layers are `{prefix}.{n}.{weight,bias}` for the
    /// numeric `n` present, in order. Returns its config, input and output widths, and
    /// its tensors under this crate's names (`{to}.{2i}.weight`).
    pub fn mlp(
        &mut self,
        prefix: &str,
        to: &str,
        activation: Activation,
        out: &mut HashMap<String, Tensor>,
    ) -> Result<(NetConfig, usize, usize), IoError> {
        let layers = self.children(prefix);
        if layers.is_empty() {
            return Err(IoError::MissingTensor {
                path: self.path.clone(),
                name: format!("{prefix}.0.weight"),
            });
        }
        let mut widths = Vec::new();
        let mut in_dim = 0;
        for (i, n) in layers.iter().enumerate() {
            let wname = format!("{prefix}.{n}.weight");
            let shape = self.shape(&wname)?;
            let [o, inp] = shape[..] else {
                return Err(
                    self.invalid(format!("`{wname}` is not a Linear weight: shape {shape:?}"))
                );
            };
            if i == 0 {
                in_dim = inp;
            } else if inp != *widths.last().unwrap_or(&0) {
                return Err(IoError::ShapeMismatch {
                    path: self.path.clone(),
                    name: wname,
                    expected: vec![o, *widths.last().unwrap_or(&0)],
                    found: shape,
                });
            }
            out.insert(
                format!("{to}.{}.weight", 2 * i),
                self.float(&wname, &[o, inp])?,
            );
            out.insert(
                format!("{to}.{}.bias", 2 * i),
                self.float(&format!("{prefix}.{n}.bias"), &[o])?,
            );
            widths.push(o);
        }
        let out_dim = widths.pop().unwrap_or(0);
        Ok((
            NetConfig::Mlp {
                hidden: widths,
                activation,
            },
            in_dim,
            out_dim,
        ))
    }

    /// Fails on any tensor no importer step read.
    pub fn finish(self) -> Result<(), IoError> {
        match self.unused.into_iter().next() {
            Some(name) => Err(IoError::UnexpectedTensor {
                path: self.path,
                name,
            }),
            None => Ok(()),
        }
    }
}
