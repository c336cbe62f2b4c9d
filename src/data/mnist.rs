//! MNIST in its IDX format (optionally gzipped), padded to 32x32 and scaled to [-1, 1].

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, positive};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory holding the MNIST IDX files.
    pub dir: PathBuf,
    /// Digits used for training (the first `train_count` of the file).
    pub train_count: usize,
    /// Held-out digits (the last `heldout_count` of the file), never trained on.
    pub heldout_count: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { dir: "data".into(), train_count: 9000, heldout_count: 1000 }
    }
}

impl DataConfig {
    /// `[data]`'s ranges.
    pub fn validate(&self) -> Result<()> {
        positive("data.train_count", self.train_count)?;
        positive("data.heldout_count", self.heldout_count)?;
        Ok(())
    }
}

pub const IMAGES_FILE: &str = "mnist-10k-images-idx3-ubyte.gz";
pub const LABELS_FILE: &str = "mnist-10k-labels-idx1-ubyte.gz";
/// Side of the padded images every model sees.
pub const SIDE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Heldout,
}

/// Digits as `[-1, 1]` floats, 32x32, row-major, with labels.
#[derive(Debug, Clone)]
pub struct Mnist {
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
}

impl Mnist {
    /// Loads the split from `dir`: the first `train_count` digits, or the last `heldout_count`.
    pub fn load(dir: &Path, split: Split, train_count: usize, heldout_count: usize) -> Result<Self> {
        let (pixels, rows, cols) = read_idx_images(&dir.join(IMAGES_FILE))?;
        let labels = read_idx_labels(&dir.join(LABELS_FILE))?;
        let n = labels.len();
        if pixels.len() != n * rows * cols {
            return Err(Error::runtime(format!(
                "{}: holds {} images but {} has {n} labels",
                dir.join(IMAGES_FILE).display(),
                pixels.len() / (rows * cols),
                LABELS_FILE
            )));
        }
        if train_count + heldout_count > n || rows > SIDE || cols > SIDE {
            return Err(Error::usage(format!(
                "data.train_count + data.heldout_count = {} exceeds the {n} digits in {}",
                train_count + heldout_count,
                dir.display()
            )));
        }
        let range = match split {
            Split::Train => 0..train_count,
            Split::Heldout => n - heldout_count..n,
        };
        let (pr, pc) = ((SIDE - rows) / 2, (SIDE - cols) / 2);
        let mut images = vec![-1.0f32; range.len() * SIDE * SIDE];
        for (k, i) in range.clone().enumerate() {
            for r in 0..rows {
                for c in 0..cols {
                    let v = pixels[i * rows * cols + r * cols + c] as f32 / 255.0;
                    images[k * SIDE * SIDE + (r + pr) * SIDE + c + pc] = v * 2.0 - 1.0;
                }
            }
        }
        Ok(Self { images, labels: labels[range].to_vec() })
    }

    /// Loads a split as the `[data]` section of a config describes it.
    pub fn from_config(cfg: &DataConfig, split: Split) -> Result<Self> {
        Self::load(&cfg.dir, split, cfg.train_count, cfg.heldout_count)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Images `[B, 1, 32, 32]` and labels `[B]` of the given indices.
    pub fn batch(&self, indices: &[usize], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
        let px = SIDE * SIDE;
        let mut data = Vec::with_capacity(indices.len() * px);
        for &i in indices {
            data.extend_from_slice(&self.images[i * px..(i + 1) * px]);
        }
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i] as i64).collect();
        (
            Tensor::from_data(TensorData::new(data, [indices.len(), 1, SIDE, SIDE]), device),
            Tensor::from_data(TensorData::new(labels, [indices.len()]), device),
        )
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| {
        Error::runtime(format!(
            "cannot read {}: {e} (set data.dir to the folder holding the MNIST IDX files)",
            path.display()
        ))
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::runtime(format!("{}: corrupt gzip stream: {e}", path.display())))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Reads an IDX3 (`0x00000803`) file: pixels, rows, cols.
pub fn read_idx_images(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let b = read_maybe_gz(path)?;
    if b.len() < 16 || be_u32(&b, 0) != 0x0803 {
        return Err(Error::runtime(format!("{}: not an IDX image file (bad magic)", path.display())));
    }
    let (n, rows, cols) = (be_u32(&b, 4) as usize, be_u32(&b, 8) as usize, be_u32(&b, 12) as usize);
    if b.len() != 16 + n * rows * cols {
        return Err(Error::runtime(format!(
            "{}: header announces {n} images of {rows}x{cols} but the file holds {} bytes of pixels",
            path.display(),
            b.len() - 16
        )));
    }
    Ok((b[16..].to_vec(), rows, cols))
}

/// Reads an IDX1 (`0x00000801`) label file.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let b = read_maybe_gz(path)?;
    if b.len() < 8 || be_u32(&b, 0) != 0x0801 {
        return Err(Error::runtime(format!("{}: not an IDX label file (bad magic)", path.display())));
    }
    let n = be_u32(&b, 4) as usize;
    if b.len() != 8 + n {
        return Err(Error::runtime(format!(
            "{}: header announces {n} labels but holds {}",
            path.display(),
            b.len() - 8
        )));
    }
    Ok(b[8..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendored_split_has_the_documented_counts() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
        let train = Mnist::load(&dir, Split::Train, 9000, 1000).unwrap();
        let held = Mnist::load(&dir, Split::Heldout, 9000, 1000).unwrap();
        assert_eq!(train.len(), 9000);
        assert_eq!(held.len(), 1000);
        let mut counts = [0usize; 10];
        for &l in train.labels.iter().chain(&held.labels) {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]);
        // Padding is background (-1) and pixels stay in range.
        assert_eq!(train.images[0], -1.0);
        assert!(train.images.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.idx");
        std::fs::write(&p, [0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 28, 0, 0, 0, 28, 1, 2]).unwrap();
        let e = read_idx_images(&p).unwrap_err();
        assert!(e.message.contains("header announces 5 images"), "{e}");
    }
}
