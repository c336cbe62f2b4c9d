//! A minimal line plot rendered straight to PNG (loss curves), so that a run leaves a picture
//! without a plotting dependency.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::Result;
use crate::train::metrics::StepMetrics;

const W: u32 = 640;
const H: u32 = 360;
const M: u32 = 40;

/// Plots series of (x, y) points, each in its own colour, on shared axes (log-scale y when
/// `log_y`). Axes span the data; a faint grid marks decades (log) or quarters (linear).
pub fn line_plot(series: &[(Vec<(f64, f64)>, [u8; 3])], log_y: bool) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let ty = |y: f64| if log_y { y.max(1e-12).log10() } else { y };
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(s, _)| s.iter().map(|&(x, y)| (x, ty(y))))
        .filter(|p| p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return img;
    }
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if (y1 - y0).abs() < 1e-12 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let px = |x: f64| M as f64 + (x - x0) / (x1 - x0).max(1e-12) * (W - 2 * M) as f64;
    let py = |y: f64| (H - M) as f64 - (y - y0) / (y1 - y0) * (H - 2 * M) as f64;
    let grid = Rgb([225, 225, 225]);
    let ticks: Vec<f64> = if log_y {
        (y0.floor() as i32..=y1.ceil() as i32).map(f64::from).filter(|v| *v >= y0 && *v <= y1).collect()
    } else {
        (0..=4).map(|i| y0 + (y1 - y0) * i as f64 / 4.0).collect()
    };
    for v in ticks {
        draw_line(&mut img, (M as f64, py(v)), ((W - M) as f64, py(v)), grid);
    }
    let axis = Rgb([0, 0, 0]);
    draw_line(&mut img, (M as f64, (H - M) as f64), ((W - M) as f64, (H - M) as f64), axis);
    draw_line(&mut img, (M as f64, M as f64), (M as f64, (H - M) as f64), axis);
    for (s, colour) in series {
        let s: Vec<(f64, f64)> =
            s.iter().map(|&(x, y)| (px(x), py(ty(y)))).filter(|p| p.1.is_finite()).collect();
        for w in s.windows(2) {
            draw_line(&mut img, w[0], w[1], Rgb(*colour));
        }
    }
    img
}

fn draw_line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// Training loss against step (log scale), raw in light blue and a moving average in dark blue.
pub fn loss_curve(path: &Path, metrics: &[StepMetrics]) -> Result<()> {
    let raw: Vec<(f64, f64)> = metrics.iter().map(|m| (m.step as f64, m.loss)).collect();
    let k = 10usize;
    let smooth: Vec<(f64, f64)> = (0..raw.len())
        .map(|i| {
            let lo = i.saturating_sub(k - 1);
            let w = &raw[lo..=i];
            (raw[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    let img = line_plot(&[(raw, [160, 190, 230]), (smooth, [20, 60, 160])], true);
    super::grid::save_png(path, &image::DynamicImage::ImageRgb8(img))
}
