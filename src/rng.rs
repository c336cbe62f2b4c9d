//! The project's single source of randomness. Everything random (weight init, data order, noise,
//! timesteps, label dropout) is drawn on the host from one ChaCha stream, so a seed fixes a run on
//! every backend and the generator's state can be written into a checkpoint and restored exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Every stream id and seed derivation of the crate in one table: a run's randomness is
/// `SeededRng::derived(run.seed, id)` per purpose, so adding a draw to one purpose never shifts
/// another's numbers. Changing a value here changes every result that used it (the committed
/// records stop reproducing): add new ids, never renumber.
pub mod stream {
    /// `msfp pretrain`: the model's initial weights.
    pub const PRETRAIN_INIT: u64 = 0;
    /// `msfp pretrain`: timesteps, noise and label dropout, in step order.
    pub const PRETRAIN_TRAIN: u64 = 1;
    /// `msfp pretrain`: the data order of epoch e is stream `PRETRAIN_EPOCH + e`.
    pub const PRETRAIN_EPOCH: u64 = 1000;
    /// `msfp train-classifier`: initial weights and batches.
    pub const CLASSIFIER_INIT: u64 = 0;
    pub const CLASSIFIER_TRAIN: u64 = 1;
    /// Fine-tuning (`msfp train`): the calibration trajectories' classes and noise.
    pub const FINETUNE_CALIB: u64 = 10;
    /// Fine-tuning: the adapters' initial A factors.
    pub const FINETUNE_ADAPTERS: u64 = 11;
    /// Fine-tuning: trajectory i (classes, x_T, sampler noise) is stream `FINETUNE_TRAJECTORY + i`.
    pub const FINETUNE_TRAJECTORY: u64 = 1 << 32;
    /// `model.sd.random_weights` (seed 0): one stream per network, so each builds alone.
    pub const SD_RANDOM_UNET: u64 = 0;
    pub const SD_RANDOM_VAE: u64 = 1;
    pub const SD_RANDOM_TEXT: u64 = 2;
    /// Calibration's activation reservoirs (`quant::calib::ActStats`), from the site's seed.
    pub const CALIB_RESERVOIR: u64 = 0x5eed_ac75;
    /// Seeds derived from `run.seed` rather than streams: site i's observer seed is
    /// `seed + i`; its timestep slot k's reservoir seed is that `^ ((k + 1) << 40)`;
    /// HQ-DiT's random Hadamard signs for site i are seeded `seed ^ (HADAMARD_SIGNS + i)`.
    pub const HADAMARD_SIGNS: u64 = 0x4844_0000;
    /// The shift of a timestep slot's reservoir seed (see [`HADAMARD_SIGNS`]).
    pub const SLOT_SHIFT: u32 = 40;
}

#[derive(Clone, Debug)]
pub struct SeededRng {
    inner: ChaCha8Rng,
}

/// A serialisable snapshot of a [`SeededRng`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    /// Word position in the stream; u128 does not fit JSON numbers, so it travels as a string.
    pub word_pos: String,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self { inner: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// An independent stream derived from `seed` and a purpose tag (e.g. init vs. data).
    pub fn derived(seed: u64, stream: u64) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(stream);
        Self { inner }
    }

    pub fn state(&self) -> RngState {
        RngState {
            seed: self.inner.get_seed(),
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    pub fn from_state(state: &RngState) -> Option<Self> {
        let pos: u128 = state.word_pos.parse().ok()?;
        let mut inner = ChaCha8Rng::from_seed(state.seed);
        inner.set_stream(state.stream);
        inner.set_word_pos(pos);
        Some(Self { inner })
    }

    pub fn uniform(&mut self) -> f32 {
        self.inner.random::<f32>()
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.inner.random_range(0..n)
    }

    /// A standard normal draw (Box-Muller on two uniforms; deterministic across platforms).
    pub fn normal(&mut self) -> f32 {
        let u1 = (1.0 - self.inner.random::<f64>()).max(f64::MIN_POSITIVE);
        let u2 = self.inner.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }

    /// Fisher-Yates shuffle of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.inner.random_range(0..=i);
            v.swap(i, j);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_continues_the_same_stream() {
        let mut a = SeededRng::new(7);
        a.normals(13);
        let snap = a.state();
        let expect = a.normals(5);
        let mut b = SeededRng::from_state(&snap).unwrap();
        assert_eq!(b.normals(5), expect);
        let json = serde_json::to_string(&snap).unwrap();
        let back: RngState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
    }

    #[test]
    fn normal_draws_have_unit_moments() {
        let mut r = SeededRng::new(1);
        let v = r.normals(20000);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
