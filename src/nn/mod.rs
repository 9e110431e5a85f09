//! Model code on dfdx 0.13 (unmodified, from the registry): what dfdx lacks on stable is built
//! here from its public API.
//!
//! **Layout.** Every activation is a 2-D tensor `(C·H·W, B)`: features in rows (channel-major,
//! then row, then column), the batch in columns. Every layer is then a map on rows: a conv is
//! a gathered multiply-add over whole rows ([`conv`]), a squeeze or a channel
//! permutation is a row permutation, a channel split is a row slice, the logits are 10 rows.
//!
//! **Weights files** (safetensors, [`io`]) are self-describing: the model config is JSON in the
//! metadata under `config`, next to a full description ([`describe`]: input encoding, every
//! layer with its formula and constants, latent order, permutations), and tensor names follow
//! the module tree in PyTorch's conventions, e.g. `level0.step3.coupling.conv1.weight` with
//! shape `(O, C, k, k)`, `….conv3.bias` `(O,)` (a conv without bias, like the coupling's
//! `conv1` and `conv2`, has no `.bias` tensor),
//! `level0.step3.actnorm.bias` / `.logs` `(C,)`, `level0.split.prior.weight`. A reader in
//! another framework can rebuild the model from the file alone.
//!
//! Module map: [`ops`] (conv layer, linear, permutations, losses), [`flow`] (ActNorm, couplings,
//! squeeze, split prior, fi-RevNet), [`cnn`] (the small ResNet-style classifier), [`optim`]
//! (Adam, Adamax), [`io`] (safetensors).
//!
//! All randomness (init, dropout masks, shuffling) comes from seeded ChaCha generators owned by
//! the caller, never from the device, so a run can resume mid-way and give the same bytes.

pub mod channel;
pub mod cnn;
pub mod conv;
pub mod describe;
pub mod flow;
pub mod gather;
pub mod ice;
pub mod input;
pub mod io;
pub mod matmul;
pub mod metamer;
pub mod model;
pub mod nuisance;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod train;
pub mod vector_flow;

use dfdx::prelude::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The device every tensor lives on: CPU, or CUDA with `--features cuda`.
#[cfg(not(feature = "cuda"))]
pub type Dev = dfdx::tensor::Cpu;
#[cfg(feature = "cuda")]
pub type Dev = dfdx::tensor::Cuda;

/// The name of [`Dev`], as it goes into stage keys.
pub const DEVICE_NAME: &str = if cfg!(feature = "cuda") {
    "cuda"
} else {
    "cpu"
};

/// A 2-D activation or parameter, `(rows, columns)`.
pub type T2<T = NoneTape> = Tensor<(usize, usize), f32, Dev, T>;
/// A per-example vector, `(B,)`.
pub type T1<T = NoneTape> = Tensor<(usize,), f32, Dev, T>;
/// Row indices for `gather`.
pub type Index = Tensor<(usize,), usize, Dev>;
/// Gradients of a backward pass.
pub type Grads = Gradients<f32, Dev>;

/// Tapes usable with our tensors: `NoneTape` (inference) or `OwnedTape` (training).
pub trait Tp: Tape<f32, Dev> + Merge<NoneTape> + Merge<Self> {}
impl<T: Tape<f32, Dev> + Merge<NoneTape> + Merge<T>> Tp for T {}

/// A fresh device with dfdx's allocation cache on (≈30 % faster steps). Tensors made from our
/// own `Vec`s (the custom gather, inputs) enter the cache when dropped but are never reused
/// from it, so long loops must call `empty_cache()` after every step (the trainer does).
/// Panics, saying what is missing, where [`try_device`] finds no device.
pub fn device() -> Dev {
    try_device().unwrap_or_else(|e| panic!("{e}"))
}

/// [`device`], or why there is none: always a device on CPU; on CUDA, an error where the
/// driver is missing or sees no GPU (the device tests skip on it, the stages fail on it).
pub fn try_device() -> Result<Dev, String> {
    #[cfg(not(feature = "cuda"))]
    let dev = Dev::default();
    // dfdx's `Cuda::try_build` panics inside cudarc when there is no device: ask first, and
    // say what is missing.
    #[cfg(feature = "cuda")]
    let dev = {
        let devices = cudarc::driver::result::init()
            .and_then(|()| cudarc::driver::result::device::get_count());
        match devices {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                return Err(
                    "this binary is built with --features cuda and there is no CUDA device".into(),
                )
            }
            Err(e) => {
                return Err(format!(
                    "this binary is built with --features cuda and the CUDA driver has no \
                     device: {e:?}"
                ))
            }
        }
        Dev::try_build(0, 0).map_err(|e| format!("CUDA device 0: {e:?}"))?
    };
    dev.enable_cache();
    Ok(dev)
}

/// A tensor's values in row-major order, in one `memcpy` for a contiguous tensor (dfdx's
/// `as_vec` walks a strided index iterator and pushes element by element: 7 % of a cpu
/// fi-RevNet step went there). A non-contiguous view is made contiguous first.
pub fn host_copy<S: Shape>(t: &Tensor<S, f32, Dev>) -> Vec<f32> {
    let t = t.clone().contiguous();
    let mut values = vec![0.0f32; t.shape().num_elements()];
    t.copy_into(&mut values);
    values
}

thread_local! {
    static WEIGHT_GRADIENTS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with the weights frozen: the conv and linear ops built inside it record no weight
/// gradient (their backward computes the input's only), and the `Grads` of a backward pass
/// run inside it hold none for those weights. For attacks, which differentiate with respect to
/// the image alone: the conv's weight gradient was a fifth of a PGD step on the CNN. (The
/// per-channel affine ops still sum their few parameter gradients; CUDA composes dfdx's ops,
/// which always do.)
pub fn with_frozen_weights<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the flag back on the way out, a panic included.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            WEIGHT_GRADIENTS.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(WEIGHT_GRADIENTS.with(|flag| flag.replace(false)));
    f()
}

/// Whether an op built now records its weight gradient (see [`with_frozen_weights`]).
pub fn weight_gradients_wanted() -> bool {
    WEIGHT_GRADIENTS.with(|flag| flag.get())
}

/// A named parameter. `shape` is its PyTorch shape (e.g. `(O, C, k, k)`), `value` the same
/// numbers as a 2-D tensor `(shape[0], rest)` (a vector is `(n, 1)`).
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: T2,
}

impl Param {
    pub fn new(dev: &Dev, name: impl Into<String>, shape: &[usize], data: Vec<f32>) -> Param {
        let rows = shape[0];
        let cols = shape[1..].iter().product::<usize>().max(1);
        assert_eq!(data.len(), rows * cols, "parameter data length");
        Param {
            name: name.into(),
            shape: shape.to_vec(),
            value: dev.tensor_from_vec(data, (rows, cols)),
        }
    }

    pub fn zeros(dev: &Dev, name: impl Into<String>, shape: &[usize]) -> Param {
        let n = shape.iter().product();
        Param::new(dev, name, shape, vec![0.0; n])
    }

    /// PyTorch's default init for conv/linear weights and biases: U(−1/√fan_in, 1/√fan_in).
    pub fn uniform(
        dev: &Dev,
        name: impl Into<String>,
        shape: &[usize],
        fan_in: usize,
        rng: &mut ChaCha8Rng,
    ) -> Param {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n = shape.iter().product();
        let data = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
        Param::new(dev, name, shape, data)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The parameter as a vector `(n,)` (for per-channel broadcasts).
    pub fn as_vector(&self) -> T1 {
        let n = self.numel();
        self.value.clone().reshape_like(&(n,))
    }
}

/// Anything that owns parameters, visited in a fixed order (the order of the weights file,
/// the optimiser state and the gradient list).
pub trait HasParams {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param));
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param));

    /// Saved state that is not trained (running statistics): in weights files and
    /// checkpoints, never given to the optimiser.
    fn visit_buffers<'a>(&'a self, _f: &mut dyn FnMut(&'a Param)) {}
    fn visit_buffers_mut(&mut self, _f: &mut dyn FnMut(&mut Param)) {}

    fn params(&self) -> Vec<&Param> {
        let mut out = Vec::new();
        self.visit(&mut |p| out.push(p));
        out
    }

    /// Parameters then buffers: everything a weights file holds.
    fn state(&self) -> Vec<&Param> {
        let mut out = self.params();
        self.visit_buffers(&mut |p| out.push(p));
        out
    }

    fn param_count(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }
}

/// A seeded generator for one purpose of one stage (init, dropout, shuffling, ...).
pub fn rng_for(seed: u64, purpose: &str) -> ChaCha8Rng {
    use rand::SeedableRng;
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{seed}/{purpose}").as_bytes());
    ChaCha8Rng::from_seed(digest.into())
}
