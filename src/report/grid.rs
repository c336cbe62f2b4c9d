//! PNG grids of generated images.

use std::path::Path;

use image::{GrayImage, Luma, RgbImage};

use crate::error::{Error, Result};

/// Tiles `n` square images of side `side` (values in [-1, 1], row-major) into `cols` columns.
pub fn gray_grid(images: &[f32], side: usize, cols: usize) -> GrayImage {
    let n = images.len() / (side * side);
    let rows = n.div_ceil(cols);
    let pad = 2;
    let mut img = GrayImage::from_pixel(
        (cols * (side + pad) + pad) as u32,
        (rows * (side + pad) + pad) as u32,
        Luma([64]),
    );
    for k in 0..n {
        let (r, c) = (k / cols, k % cols);
        for y in 0..side {
            for x in 0..side {
                let v = images[k * side * side + y * side + x];
                let px = (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
                img.put_pixel(
                    (pad + c * (side + pad) + x) as u32,
                    (pad + r * (side + pad) + y) as u32,
                    Luma([px]),
                );
            }
        }
    }
    img
}

/// Tiles `n` images `[3, H, W]` (channel-major, values in [-1, 1]) into `cols` columns.
pub fn rgb_grid(images: &[f32], shape: [usize; 3], cols: usize) -> RgbImage {
    let [c, h, w] = shape;
    let n = images.len() / (c * h * w);
    let rows = n.div_ceil(cols);
    let pad = 2;
    let mut img = RgbImage::from_pixel(
        (cols * (w + pad) + pad) as u32,
        (rows * (h + pad) + pad) as u32,
        image::Rgb([64; 3]),
    );
    let to_u8 = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    for k in 0..n {
        let (r, col) = (k / cols, k % cols);
        let base = k * c * h * w;
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| to_u8(images[base + ch.min(c - 1) * h * w + y * w + x]);
                img.put_pixel(
                    (pad + col * (w + pad) + x) as u32,
                    (pad + r * (h + pad) + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    img
}

/// Places grids side by side (e.g. teacher | student from the same noise).
pub fn side_by_side(grids: &[image::DynamicImage]) -> RgbImage {
    let gap = 8;
    let w: u32 = grids.iter().map(|g| g.width()).sum::<u32>() + gap * (grids.len() as u32).saturating_sub(1);
    let h = grids.iter().map(|g| g.height()).max().unwrap_or(0);
    let mut out = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut x0 = 0;
    for g in grids {
        for (x, y, p) in g.to_rgb8().enumerate_pixels() {
            out.put_pixel(x0 + x, y, *p);
        }
        x0 += g.width() + gap;
    }
    out
}

/// Saves a PNG atomically.
pub fn save_png(path: &Path, img: &image::DynamicImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::runtime(format!("{}: cannot encode PNG: {e}", path.display())))?;
    crate::base::fs::atomic_write(path, &bytes)
}
