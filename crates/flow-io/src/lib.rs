//! flow-io
