//! The CPU path's plan for one [`Geometry`]: for each output pixel the (tap, input pixel) links
//! it reads, for each input pixel the (tap, output pixel) links that read it, and the input
//! pixel of every (output pixel, tap). Built once per input size (the layer caches the
//! [`super::Plan`] that holds it): the forward GEMM runs over the first lists, the input
//! gradient's over the second, and the weight gradient reads the table.

use super::{Dev, Geometry};

/// Marks a padding tap in [`Plan::sources`].
pub(super) const NONE: u32 = u32::MAX;

/// One entry of a pixel's list: a weight tap and the pixel on the other side of it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Link {
    pub(super) tap: u32,
    pub(super) pixel: u32,
}

/// A list of links per pixel, flat (compressed sparse rows).
pub(super) struct Lists {
    pub(super) offsets: Vec<usize>,
    pub(super) links: Vec<Link>,
}

impl Lists {
    pub(super) fn of(&self, pixel: usize) -> &[Link] {
        &self.links[self.offsets[pixel]..self.offsets[pixel + 1]]
    }
}

pub struct Plan {
    /// For each output pixel, the (tap, input pixel) pairs it reads; padding taps omitted.
    pub(super) reads: Lists,
    /// For each input pixel, the (tap, output pixel) pairs that read it, by output pixel.
    pub(super) readers: Lists,
    /// `sources[p·k² + tap]`: the input pixel output pixel `p` reads at `tap`, or [`NONE`].
    pub(super) sources: Vec<u32>,
}

impl Plan {
    pub fn new(_dev: &Dev, g: &Geometry) -> Plan {
        let kk = g.kernel * g.kernel;
        let (in_pixels, out_pixels) = (g.h * g.w, g.out_h * g.out_w);
        assert!(
            in_pixels < NONE as usize && out_pixels < NONE as usize,
            "conv plan: too many pixels"
        );
        let mut sources = vec![NONE; out_pixels * kk];
        let mut reads = Lists {
            offsets: vec![0],
            links: Vec::new(),
        };
        for p in 0..out_pixels {
            for tap in 0..kk {
                if let Some(q) = g.source(p, tap) {
                    sources[p * kk + tap] = q as u32;
                    reads.links.push(Link {
                        tap: tap as u32,
                        pixel: q as u32,
                    });
                }
            }
            reads.offsets.push(reads.links.len());
        }
        // The inverse, by a stable counting sort of the reads on their input pixel.
        let mut offsets = vec![0usize; in_pixels + 1];
        for link in &reads.links {
            offsets[link.pixel as usize + 1] += 1;
        }
        for q in 0..in_pixels {
            offsets[q + 1] += offsets[q];
        }
        let mut fill = offsets.clone();
        let mut links = vec![Link { tap: 0, pixel: 0 }; reads.links.len()];
        for p in 0..out_pixels {
            for link in reads.of(p) {
                let q = link.pixel as usize;
                links[fill[q]] = Link {
                    tap: link.tap,
                    pixel: p as u32,
                };
                fill[q] += 1;
            }
        }
        Plan {
            reads,
            readers: Lists { offsets, links },
            sources,
        }
    }
}
