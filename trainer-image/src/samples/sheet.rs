//! The contact sheet of a run's sample sets, pure: every set side by side (rows: the base model, then
//! each rendered step; columns: the prompts; the step printed under each row). Which steps get
//! a set and what the files are called is the shared layout's (`loraplane_crds::layout`), the
//! default prompts the trainer contract's (`SamplesConfig::prompts_for`);
//! rendering is `preview.rs`; `mod.rs` beside this renders the sets, writes and uploads them.

use image::imageops::{self, FilterType};
use image::{Rgb, RgbImage};

/// One row of the contact sheet: the images of one set, in prompt order.
pub struct SheetRow {
    /// The training step the set was rendered at (0: the base model, before training).
    pub step: u64,
    pub images: Vec<RgbImage>,
}

/// Pixels between cells and around the sheet.
const MARGIN: u32 = 8;
/// Each font pixel drawn as a square this wide.
const FONT_SCALE: u32 = 2;
/// Height of the label strip under each row.
const LABEL_HEIGHT: u32 = GLYPH_HEIGHT * FONT_SCALE + 2 * 4;
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([0, 0, 0]);

/// What is printed under a row: `BASE` for step 0, else `STEP n`.
pub fn row_label(step: u64) -> String {
    if step == 0 {
        "BASE".to_string()
    } else {
        format!("STEP {step}")
    }
}

/// `img` scaled to a `cell` × `cell` sheet cell (a copy when it already is one).
pub fn cell(img: &RgbImage, cell: u32) -> RgbImage {
    if img.dimensions() == (cell, cell) {
        return img.clone();
    }
    imageops::resize(img, cell, cell, FilterType::Triangle)
}

/// The contact sheet of `rows`, each image scaled to `cell` × `cell` pixels.
pub fn contact_sheet(rows: &[SheetRow], cell: u32) -> RgbImage {
    let cols = rows.iter().map(|r| r.images.len()).max().unwrap_or(0) as u32;
    // Wide enough for the longest label even with one narrow column.
    let label_width = rows
        .iter()
        .map(|r| text_width(&row_label(r.step)))
        .max()
        .unwrap_or(0);
    let width = (MARGIN + cols.max(1) * (cell + MARGIN)).max(label_width + 2 * MARGIN);
    let row_height = cell + LABEL_HEIGHT + MARGIN;
    let height = MARGIN + rows.len().max(1) as u32 * row_height;
    let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);
    for (r, row) in rows.iter().enumerate() {
        let top = MARGIN + r as u32 * row_height;
        for (c, img) in row.images.iter().enumerate() {
            let scaled = self::cell(img, cell);
            let left = MARGIN + c as u32 * (cell + MARGIN);
            imageops::replace(&mut sheet, &scaled, i64::from(left), i64::from(top));
        }
        draw_text(
            &mut sheet,
            &row_label(row.step),
            MARGIN,
            top + cell + (LABEL_HEIGHT - GLYPH_HEIGHT * FONT_SCALE) / 2,
        );
    }
    sheet
}

const GLYPH_WIDTH: u32 = 5;
const GLYPH_HEIGHT: u32 = 7;

/// A 5×7 bitmap of the characters labels use (each row's five bits, leftmost first).
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        ' ' => [0; 7],
        _ => return None,
    })
}

/// The width `draw_text` needs for `text`.
fn text_width(text: &str) -> u32 {
    text.chars().filter(|&c| glyph(c).is_some()).count() as u32 * (GLYPH_WIDTH + 1) * FONT_SCALE
}

/// Draws `text` with its top-left corner at (x, y); characters without a glyph are skipped,
/// and whatever falls outside the image is clipped.
fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32) {
    let advance = (GLYPH_WIDTH + 1) * FONT_SCALE;
    for (i, bits) in text.chars().filter_map(glyph).enumerate() {
        let left = x + i as u32 * advance;
        for (row, bits) in bits.iter().enumerate() {
            for col in 0..GLYPH_WIDTH {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..FONT_SCALE {
                    for dx in 0..FONT_SCALE {
                        let (px, py) = (
                            left + col * FONT_SCALE + dx,
                            y + row as u32 * FONT_SCALE + dy,
                        );
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, INK);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(color: [u8; 3], size: u32) -> RgbImage {
        RgbImage::from_pixel(size, size, Rgb(color))
    }

    /// Reads back the text printed under row `r`, glyph by glyph (the inverse of `draw_text`).
    fn read_label(sheet: &RgbImage, r: u32, cell: u32) -> String {
        let row_height = cell + LABEL_HEIGHT + MARGIN;
        let y = MARGIN + r * row_height + cell + (LABEL_HEIGHT - GLYPH_HEIGHT * FONT_SCALE) / 2;
        let advance = (GLYPH_WIDTH + 1) * FONT_SCALE;
        let alphabet = "0123456789ABEPST ";
        let mut out = String::new();
        for i in 0.. {
            let left = MARGIN + i * advance;
            if left + GLYPH_WIDTH * FONT_SCALE > sheet.width() {
                break;
            }
            let mut bits = [0u8; 7];
            for (row, b) in bits.iter_mut().enumerate() {
                for col in 0..GLYPH_WIDTH {
                    let p = sheet.get_pixel(left + col * FONT_SCALE, y + row as u32 * FONT_SCALE);
                    if *p == INK {
                        *b |= 0x10 >> col;
                    }
                }
            }
            match alphabet.chars().find(|&c| glyph(c) == Some(bits)) {
                Some(c) => out.push(c),
                None => panic!("unreadable glyph {bits:?} at {i}"),
            }
        }
        out.trim_end().to_string()
    }

    #[test]
    fn every_glyph_is_distinct() {
        let alphabet: Vec<char> = "0123456789ABEPST".chars().collect();
        for (i, a) in alphabet.iter().enumerate() {
            for b in &alphabet[i + 1..] {
                assert_ne!(glyph(*a), glyph(*b), "{a} and {b}");
            }
        }
    }

    #[test]
    fn the_sheet_has_a_row_per_set_a_column_per_prompt_and_prints_each_step() {
        let cell = 64;
        let rows = [
            SheetRow {
                step: 0,
                images: vec![solid([200, 0, 0], 32), solid([0, 200, 0], 32)],
            },
            SheetRow {
                step: 250,
                images: vec![solid([0, 0, 200], 128), solid([90, 90, 90], 128)],
            },
        ];
        let sheet = contact_sheet(&rows, cell);
        assert_eq!(sheet.width(), MARGIN + 2 * (cell + MARGIN));
        assert_eq!(sheet.height(), MARGIN + 2 * (cell + LABEL_HEIGHT + MARGIN));
        // Each cell holds its image, scaled to the cell.
        let row_height = cell + LABEL_HEIGHT + MARGIN;
        for (r, row) in rows.iter().enumerate() {
            for (c, img) in row.images.iter().enumerate() {
                let (x, y) = (
                    MARGIN + c as u32 * (cell + MARGIN) + cell / 2,
                    MARGIN + r as u32 * row_height + cell / 2,
                );
                assert_eq!(
                    sheet.get_pixel(x, y),
                    img.get_pixel(0, 0),
                    "row {r} column {c}"
                );
            }
        }
        assert_eq!(read_label(&sheet, 0, cell), "BASE");
        assert_eq!(read_label(&sheet, 1, cell), "STEP 250");
    }
}
