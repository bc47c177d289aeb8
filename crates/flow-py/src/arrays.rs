//! numpy arrays in and out, and option values by name.

use candle::{Device, Tensor};
use flow_nn::Activation;
use numpy::{IntoPyArray, PyArrayMethods};
use pyo3::{prelude::*, types::PyAny};

use flow_train::DataError;

use crate::errors::value_error;

/// Rows of numbers read from a numpy array (or anything `numpy.asarray` makes one of)
/// of booleans, integers or reals, every value finite in f32: row-major `f32`, the
/// dtype models compute in, and whether the caller's array was `float64`, so that
/// results come back in the caller's precision.
#[derive(Debug)]
pub struct Rows {
    pub values: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub double: bool,
}

impl Rows {
    /// `array` as rows of `cols` values, named `what` in errors.
    pub fn read(array: &Bound<'_, PyAny>, cols: usize, what: &str) -> PyResult<Self> {
        let py = array.py();
        let numpy = py.import("numpy")?;
        let mut array = numpy.call_method1("asarray", (array,))?;
        let dtype = array.getattr("dtype")?;
        // Booleans, integers and reals; not complex numbers, text or objects, which
        // numpy would turn into reals by dropping or guessing.
        let kind: String = dtype.getattr("kind")?.extract()?;
        let dtype: String = dtype.str()?.extract()?;
        if !matches!(kind.as_str(), "b" | "i" | "u" | "f") {
            return Err(value_error(format!(
                "{what} must hold real numbers, got an array of dtype {dtype}"
            )));
        }
        let double = dtype != "float32";
        if dtype != "float32" && dtype != "float64" {
            array = numpy.call_method1("asarray", (array, "float64"))?;
        }
        let shape: Vec<usize> = array.getattr("shape")?.extract()?;
        if shape.len() != 2 || shape[1] != cols {
            return Err(value_error(format!(
                "{what} must be a 2-D array of shape (rows, {cols}), got shape {}",
                shape_text(&shape)
            )));
        }
        // Each value as f32, with what is wrong with the first that is not a finite one.
        let mut bad: Option<(usize, String)> = None;
        let mut note = |i: usize, v: f64| {
            if bad.is_none() && !(v as f32).is_finite() {
                let why = if v.is_finite() {
                    format!("{v:e} lies beyond float32, in which the model computes")
                } else {
                    "NaN or infinite value".to_string()
                };
                bad = Some((i, why));
            }
        };
        let values: Vec<f32> = if double {
            let a = array.cast::<numpy::PyArray2<f64>>()?.readonly();
            let a = a.as_array();
            a.iter()
                .enumerate()
                .map(|(i, &v)| {
                    note(i, v);
                    v as f32
                })
                .collect()
        } else {
            let a = array.cast::<numpy::PyArray2<f32>>()?.readonly();
            let a = a.as_array();
            a.iter()
                .enumerate()
                .map(|(i, &v)| {
                    note(i, f64::from(v));
                    v
                })
                .collect()
        };
        if let Some((i, why)) = bad {
            // As `fit` names a row of its data: `x: line 2: …`.
            let row = i / cols.max(1) + 1;
            return Err(value_error(DataError::new(what, Some(row), why).to_string()));
        }
        Ok(Self {
            values,
            rows: shape[0],
            cols,
            double,
        })
    }

    /// The rows as a `(rows, cols)` tensor on the CPU.
    pub fn tensor(&self) -> candle::Result<Tensor> {
        Tensor::from_slice(&self.values, (self.rows, self.cols), &Device::Cpu)
    }
}

/// `(a, b)` as Python writes a shape.
fn shape_text(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", parts.join(", "))
        }
    }
}

/// `values` (`rows × cols`, or a vector with `cols == 0`) as a numpy array, `float64`
/// when `double`.
pub fn to_numpy(
    py: Python<'_>,
    values: Vec<f32>,
    rows: usize,
    cols: Option<usize>,
    double: bool,
) -> PyResult<Py<PyAny>> {
    let array = if double {
        let v: Vec<f64> = values.into_iter().map(f64::from).collect();
        let a = v.into_pyarray(py);
        match cols {
            Some(c) => a.reshape([rows, c])?.into_any().unbind(),
            None => a.into_any().unbind(),
        }
    } else {
        let a = values.into_pyarray(py);
        match cols {
            Some(c) => a.reshape([rows, c])?.into_any().unbind(),
            None => a.into_any().unbind(),
        }
    };
    Ok(array)
}

/// The activation `name` names, or the list of those there are.
pub fn activation(name: &str) -> PyResult<Activation> {
    flow_models::options::choice("activation", name, &Activation::ALL, Activation::name)
        .map_err(value_error)
}
