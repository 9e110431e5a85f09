//! Image figures as the report shows them: the upstream stages write digit grids at the scale
//! that suits their own check (28-pixel digits drawn 2× or 3×); a reader needs a digit at least
//! 84 pixels wide to see strokes, so the report enlarges the smaller grids by an integer factor
//! (nearest neighbour: every pixel stays a crisp block, nothing is interpolated).

use anyhow::{ensure, Context, Result};

/// The smallest digit the report shows, in screen pixels.
pub const MIN_DIGIT_PIXELS: usize = 84;

/// The integer enlargement that makes a digit drawn `digit_pixels` wide at least
/// [`MIN_DIGIT_PIXELS`] wide.
pub fn factor_for(digit_pixels: usize) -> usize {
    MIN_DIGIT_PIXELS.div_ceil(digit_pixels.max(1)).max(1)
}

/// `png` enlarged `factor`× by pixel replication (8-bit grey, grey + alpha, RGB or RGBA).
pub fn upscale_png(png_bytes: &[u8], factor: usize) -> Result<Vec<u8>> {
    ensure!(factor >= 1, "upscale factor must be at least 1");
    let decoder = png::Decoder::new(png_bytes);
    let mut reader = decoder.read_info().context("reading a PNG header")?;
    let mut pixels = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).context("decoding a PNG")?;
    ensure!(
        info.bit_depth == png::BitDepth::Eight,
        "only 8-bit PNGs are enlarged (got {:?})",
        info.bit_depth
    );
    let channels = info.color_type.samples();
    let (width, height) = (info.width as usize, info.height as usize);
    let row_bytes = info.line_size;
    let (new_width, new_height) = (width * factor, height * factor);
    let mut out_pixels = Vec::with_capacity(new_width * new_height * channels);
    for y in 0..height {
        let row = &pixels[y * row_bytes..y * row_bytes + width * channels];
        let mut wide = Vec::with_capacity(new_width * channels);
        for x in 0..width {
            let pixel = &row[x * channels..(x + 1) * channels];
            for _ in 0..factor {
                wide.extend_from_slice(pixel);
            }
        }
        for _ in 0..factor {
            out_pixels.extend_from_slice(&wide);
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, new_width as u32, new_height as u32);
        encoder.set_color(info.color_type);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&out_pixels)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey_png(width: u32, height: u32, pixels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .unwrap()
            .write_image_data(pixels)
            .unwrap();
        out
    }

    #[test]
    fn every_pixel_becomes_a_block_of_the_same_value() {
        let small = grey_png(2, 1, &[10, 200]);
        let big = upscale_png(&small, 3).unwrap();
        let mut reader = png::Decoder::new(&big[..]).read_info().unwrap();
        let mut pixels = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (6, 3));
        for row in pixels.chunks(6) {
            assert_eq!(row, [10, 10, 10, 200, 200, 200]);
        }
    }

    #[test]
    fn digits_drawn_two_or_three_times_reach_84_pixels() {
        assert_eq!(factor_for(56), 2);
        assert_eq!(factor_for(84), 1);
        assert_eq!(factor_for(28), 3);
        assert!(56 * factor_for(56) >= MIN_DIGIT_PIXELS);
    }
}
