//! The small ResNet-style MNIST classifier: the standard-network baseline (shiftMNIST, the
//! gradient attack) and, as an ensemble over seeds, the *oracle* that judges what an image
//! looks like (paper-notes § 4).
//!
//! ```text
//! x (1·28·28) → conv3×3 1→w → ReLU → ResBlock(w) → conv3×3 w→2w stride 2 → ReLU (14×14)
//!   → ResBlock(2w) → conv3×3 2w→2w stride 2 → ReLU (7×7) → flatten → linear 2w·49→128 → ReLU
//!   → linear 128→10
//! ResBlock(c): ReLU(x + conv3×3(ReLU(conv3×3(x))))
//! ```
//! With width w = 16 this is 239 306 parameters, the same model as `cnn_small` in
//! bench/pytorch_train_step.py. (A global-average-pool head learned far slower: 8.8 % test
//! error after one epoch in PyTorch against 1.8 % for this head.)

use dfdx::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ops::{Conv2d, Linear};
use super::{Dev, HasParams, Param, Tp, T2};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnConfig {
    pub width: usize,
    pub side: usize,
    pub classes: usize,
}

pub(super) struct ResBlock {
    pub(super) conv1: Conv2d,
    pub(super) conv2: Conv2d,
}

impl ResBlock {
    fn forward<T: Tp>(&self, x: T2<T>, side: usize) -> T2<T> {
        let (h, _, _) = self.conv1.forward(x.with_empty_tape(), side, side);
        let (h, _, _) = self.conv2.forward(h.relu(), side, side);
        (h + x).relu()
    }
}

/// The classifier.
pub struct SmallCnn {
    pub config: CnnConfig,
    pub(super) stem: Conv2d,
    pub(super) block1: ResBlock,
    pub(super) down1: Conv2d,
    pub(super) block2: ResBlock,
    pub(super) down2: Conv2d,
    pub(super) hidden: Linear,
    pub(super) head: Linear,
}

impl SmallCnn {
    pub fn new(dev: &Dev, config: CnnConfig, rng: &mut ChaCha8Rng) -> SmallCnn {
        let w = config.width;
        let conv = |name: &str, c_in, c_out, stride, rng: &mut ChaCha8Rng| {
            Conv2d::init(dev, name, c_in, c_out, 3, stride, 1, rng)
        };
        SmallCnn {
            stem: conv("stem", 1, w, 1, rng),
            block1: ResBlock {
                conv1: conv("block1.conv1", w, w, 1, rng),
                conv2: conv("block1.conv2", w, w, 1, rng),
            },
            down1: conv("down1", w, 2 * w, 2, rng),
            block2: ResBlock {
                conv1: conv("block2.conv1", 2 * w, 2 * w, 1, rng),
                conv2: conv("block2.conv2", 2 * w, 2 * w, 1, rng),
            },
            down2: conv("down2", 2 * w, 2 * w, 2, rng),
            hidden: Linear::init(dev, "hidden", 2 * w * 49, 128, rng),
            head: Linear::init(dev, "head", 128, config.classes, rng),
            config,
        }
    }

    /// `x (side·side, B)` in [0, 1] → logits `(classes, B)`.
    pub fn forward<T: Tp>(&self, x: T2<T>) -> T2<T> {
        self.logits_from_penultimate(self.penultimate(x))
    }

    /// The head alone: penultimate activations `(128, B)` → logits `(classes, B)`.
    pub fn logits_from_penultimate<T: Tp>(&self, h: T2<T>) -> T2<T> {
        self.head.forward(h)
    }

    /// The penultimate activations `(128, B)`: the ReLU of the hidden linear layer, which the
    /// head reads (the invariance attack matches them).
    pub fn penultimate<T: Tp>(&self, x: T2<T>) -> T2<T> {
        let s = self.config.side;
        let (h, _, _) = self.stem.forward(x, s, s);
        let h = self.block1.forward(h.relu(), s);
        let (h, s, _) = self.down1.forward(h, s, s);
        let h = self.block2.forward(h.relu(), s);
        let (h, s, _) = self.down2.forward(h, s, s);
        assert_eq!(s, 7, "the head expects a 7×7 map (28×28 input)");
        // The row layout is already flat: (2w·7·7, B), channel-major like PyTorch's flatten.
        self.hidden.forward(h.relu()).relu()
    }
}

impl HasParams for SmallCnn {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.stem.visit(f);
        for conv in [
            &self.block1.conv1,
            &self.block1.conv2,
            &self.down1,
            &self.block2.conv1,
            &self.block2.conv2,
            &self.down2,
        ] {
            conv.visit(f);
        }
        self.hidden.visit(f);
        self.head.visit(f);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.stem.visit_mut(f);
        for conv in [
            &mut self.block1.conv1,
            &mut self.block1.conv2,
            &mut self.down1,
            &mut self.block2.conv1,
            &mut self.block2.conv2,
            &mut self.down2,
        ] {
            conv.visit_mut(f);
        }
        self.hidden.visit_mut(f);
        self.head.visit_mut(f);
    }
}
