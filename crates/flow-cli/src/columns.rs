//! Column names: the training file's header goes into the model, so that samples,
//! encodings and decodings come back with the same names.

use std::path::Path;

use flow_models::ModelConfig;

use crate::Failure;

/// `model` with the column names of the training file `data` (a CSV file's header),
/// where it has names and the model has none yet (a resumed run keeps its own). Names
/// the model cannot keep (see [`ModelConfig::validate`]) are dropped with a warning:
/// the columns are then numbered.
pub fn recorded(model: ModelConfig, data: &str) -> Result<ModelConfig, Failure> {
    let path = Path::new(data);
    if model.columns.is_some() || model.image_info().is_some() || !path.is_file() {
        return Ok(model);
    }
    let Some(names) = flow_train::data::column_names(path)? else {
        return Ok(model);
    };
    let named = model.clone().with_columns(names);
    match named.validate() {
        Ok(()) => Ok(named),
        Err(e) => {
            eprintln!("warning: {data}: column names not kept ({e})");
            Ok(model)
        }
    }
}
