//! The device a tensor test runs on, in candle's style, with the tolerances that hold there.
//!
//! Our `Dev` is chosen when the crate is built (`repro::nn::Dev`), so one test binary holds one
//! device: `just test` builds for the CPU and runs every tensor test there, always;
//! `just test-cuda` builds the same tests with `--features cuda` and runs them on the GPU.
//! A test takes its device with [`device_or_skip!`]: without a GPU the CUDA build prints
//! `<test>: skipped: no CUDA device (…)` on the terminal (past the harness's capture, so it
//! shows in the plain `cargo test` listing) and returns; with `REPRO_REQUIRE_CUDA=1` (set it on
//! GPU machines) a missing device fails the test instead, so a broken driver cannot pass as a
//! skip.
//!
//! What is bitwise, and where:
//! - **CPU: everything.** Our kernels split work independently of the thread count and sum in
//!   a fixed order, so one key gives the same bytes on every run and thread count.
//! - **CUDA: nothing is claimed.** dfdx's reductions (`sum`, the backward of every broadcast:
//!   biases, ActNorm) and the row gather's backward (a scatter-add) accumulate with
//!   `atomicAdd`, whose order changes from run to run, and cuBLAS chooses its GEMM algorithm
//!   per shape. Tests compare with [`TestDevice::tol`]; the tests whose claim *is* bitwise
//!   identity (thread counts, resumed training, fused vs unfused bits) and the CPU kernels'
//!   own tests are [`cpu_only`] and say so on CUDA.
//!
//! The CUDA tolerances are not measured yet (no GPU has been lent to this project): they are
//! the CPU ones times ten for f32 sums taken in another order, to be tightened on a GPU.

use std::io::Write;

use repro::nn::Dev;

/// Which device the tests of this build run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// The device under test.
pub struct TestDevice {
    pub dev: Dev,
    pub kind: DeviceKind,
}

impl TestDevice {
    /// The tolerance for this device: `cpu` on the CPU, `cuda` on the GPU.
    pub fn tol(&self, cpu: f64, cuda: f64) -> f64 {
        match self.kind {
            DeviceKind::Cpu => cpu,
            DeviceKind::Cuda => cuda,
        }
    }

    /// [`TestDevice::tol`] for f32 comparisons.
    pub fn tol32(&self, cpu: f32, cuda: f32) -> f32 {
        self.tol(cpu as f64, cuda as f64) as f32
    }

    /// Whether results on this device are bitwise reproducible (see the module docs).
    pub fn bitwise(&self) -> bool {
        self.kind == DeviceKind::Cpu
    }
}

/// Writes one line to the terminal, past the test harness's capture (which intercepts only
/// the `print!` family), so that skips show in the ordinary `cargo test` output.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// This build's device for test `test`, or `None` (having said so) where the CUDA build finds
/// no GPU. Panics instead under `REPRO_REQUIRE_CUDA=1`.
pub fn test_device(test: &str) -> Option<TestDevice> {
    let kind = if cfg!(feature = "cuda") {
        DeviceKind::Cuda
    } else {
        DeviceKind::Cpu
    };
    match repro::nn::try_device() {
        Ok(dev) => Some(TestDevice { dev, kind }),
        Err(why) if std::env::var_os("REPRO_REQUIRE_CUDA").is_some_and(|v| v == "1") => {
            panic!("{test}: REPRO_REQUIRE_CUDA=1 and {why}")
        }
        Err(why) => {
            report(&format!("{test}: skipped: no CUDA device ({why})"));
            None
        }
    }
}

/// True (having said why) where this build is not the CPU one: the caller returns at once.
pub fn cpu_only(test: &str, reason: &str) -> bool {
    if cfg!(feature = "cuda") {
        report(&format!("{test}: skipped on CUDA: {reason}"));
        true
    } else {
        false
    }
}

/// `let device = device_or_skip!("test_name");` — the device, or return from the test.
#[macro_export]
macro_rules! device_or_skip {
    ($test:expr) => {
        match $crate::common::device::test_device($test) {
            Some(device) => device,
            None => return,
        }
    };
}
