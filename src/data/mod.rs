//! Datasets for the tiny models.

pub mod mnist;

pub use mnist::{Mnist, Split};
