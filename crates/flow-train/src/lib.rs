//! flow-train
