//! Argument parsing the examples share.

#![allow(dead_code)]

/// A count of at least 1 (`clap`'s `value_parser`).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least 1")),
    }
}
