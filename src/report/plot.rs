//! A minimal line plot rendered straight to PNG (loss curves, router choices), so that a run
//! leaves a picture without a plotting dependency: axes, a grid, and tick values and axis names
//! in a built-in 3x5 pixel font.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::Result;
use crate::train::metrics::StepMetrics;

const W: u32 = 640;
const H: u32 = 360;
const M: u32 = 40;

/// Plots series of (x, y) points, each in its own colour, on shared axes (log-scale y when
/// `log_y`). Axes span the data; a faint grid marks decades (log) or quarters (linear), with
/// their values; `x_name` / `y_name` label the axes.
pub fn line_plot(series: &[(Vec<(f64, f64)>, [u8; 3])], log_y: bool, x_name: &str, y_name: &str) -> RgbImage {
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
    let axis = Rgb([0, 0, 0]);
    for v in ticks {
        draw_line(&mut img, (M as f64, py(v)), ((W - M) as f64, py(v)), grid);
        let label = if log_y { format!("1e{}", v.round() as i64) } else { tick_label(v) };
        let x = (M as i64 - 4 - text_width(&label) as i64).max(0);
        draw_text(&mut img, x as u32, (py(v) as i64 - 5).max(0) as u32, &label, axis);
    }
    for i in 0..=4 {
        let v = x0 + (x1 - x0) * i as f64 / 4.0;
        let label = tick_label(v);
        let x = (px(v) as i64 - text_width(&label) as i64 / 2).max(0) as u32;
        draw_line(&mut img, (px(v), (H - M) as f64), (px(v), (H - M + 3) as f64), axis);
        draw_text(&mut img, x, H - M + 6, &label, axis);
    }
    draw_text(&mut img, W - M - text_width(x_name), H - 12, x_name, axis);
    draw_text(&mut img, 4, 8, y_name, axis);
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

/// A tick value in at most four significant digits, without trailing zeros.
fn tick_label(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.round() {
        return format!("{}", v.round() as i64);
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.digits$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// 3x5 glyphs, one row of three bits per entry (top row first); unknown characters are blank.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        'a' => [0, 6, 3, 5, 7],
        'd' => [1, 1, 7, 5, 7],
        'e' => [0, 7, 7, 4, 7],
        'i' => [2, 0, 2, 2, 2],
        'l' => [2, 2, 2, 2, 3],
        'm' => [0, 7, 7, 5, 5],
        'o' => [0, 7, 5, 5, 7],
        'p' => [0, 7, 5, 7, 4],
        'r' => [0, 7, 4, 4, 4],
        's' => [0, 7, 6, 3, 7],
        't' => [2, 7, 2, 2, 3],
        'b' => [4, 4, 7, 5, 7],
        'c' => [0, 7, 4, 4, 7],
        'f' => [3, 2, 7, 2, 2],
        'g' => [0, 7, 5, 7, 3],
        'h' => [4, 4, 7, 5, 5],
        'k' => [4, 5, 6, 5, 5],
        'n' => [0, 6, 5, 5, 5],
        'q' => [0, 7, 5, 7, 1],
        'u' => [0, 5, 5, 5, 7],
        'v' => [0, 5, 5, 5, 2],
        'w' => [0, 5, 5, 7, 7],
        'x' => [0, 5, 2, 2, 5],
        'y' => [0, 5, 7, 1, 7],
        'z' => [0, 7, 1, 4, 7],
        '_' => [0, 0, 0, 0, 7],
        _ => [0; 5],
    }
}

/// Names the series of a [`line_plot`] in its upper right corner: a short line of each colour
/// and its name.
pub fn legend(img: &mut RgbImage, entries: &[(&str, [u8; 3])]) {
    let widest = entries.iter().map(|(name, _)| text_width(name)).max().unwrap_or(0);
    let x = W - M - widest - 24;
    for (i, (name, colour)) in entries.iter().enumerate() {
        let y = M + 4 + i as u32 * 14;
        draw_line(img, (x as f64, y as f64 + 5.0), (x as f64 + 16.0, y as f64 + 5.0), Rgb(*colour));
        draw_text(img, x + 22, y, name, Rgb([0, 0, 0]));
    }
}

/// Glyphs are drawn at twice their size: 6x10 pixels and 2 pixels apart.
const SCALE: u32 = 2;

fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * 4 * SCALE
}

fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, c: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..3u32 {
                if bits & (4 >> col) == 0 {
                    continue;
                }
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let px = x + (i as u32 * 4 + col) * SCALE + dx;
                    let py = y + row as u32 * SCALE + dy;
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, c);
                    }
                }
            }
        }
    }
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
    let img = line_plot(&[(raw, [160, 190, 230]), (smooth, [20, 60, 160])], true, "step", "loss");
    super::grid::save_png(path, &image::DynamicImage::ImageRgb8(img))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dark_pixels(img: &RgbImage, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>) -> usize {
        xs.flat_map(|x| ys.clone().map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y)[0] < 100)
            .count()
    }

    #[test]
    fn plots_carry_tick_values_and_axis_names() {
        let points: Vec<(f64, f64)> = (0..50).map(|i| (i as f64 * 10.0, 1.0 / (1.0 + i as f64))).collect();
        let img = line_plot(&[(points, [0, 0, 0])], true, "step", "loss");
        // Tick values left of the y axis and under the x axis, names in the corners.
        assert!(dark_pixels(&img, 0..M - 2, M..H - M) > 20);
        assert!(dark_pixels(&img, M..W - M, H - M + 5..H - 14) > 20);
        assert!(dark_pixels(&img, 0..40, 0..M - 10) > 10, "y axis name");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(122.5), "122.5");
        assert_eq!(tick_label(1500.0), "1500");
        assert_eq!(tick_label(0.0123456), "0.01235");
    }
}
