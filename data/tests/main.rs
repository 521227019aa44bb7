//! The data crate's tests (one binary): converters on the real corpus samples, cleaning
//! filters, the tokenizer and chat template, packed shards byte for byte, and the iterator.

mod clean;
mod convert;
mod dataset;
mod tokenize;
