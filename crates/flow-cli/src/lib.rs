//! flow-cli
