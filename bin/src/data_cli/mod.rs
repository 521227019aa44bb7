//! The subcommands of `steel-data`, one module each.

pub mod clean;
pub mod convert;
pub mod inspect;
pub mod tokenize;
