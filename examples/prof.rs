use dfdx::prelude::*;
use rand::Rng;
use repro::nn::flow::{CouplingKind, FiRevNet, Permutation, RevNetConfig};
use repro::nn::ops::cross_entropy;
use repro::nn::optim::{Optimizer, OptimizerKind};
use repro::nn::{device, rng_for, T2};
use std::time::Instant;
fn main() {
    let dev = device();
    let mut rng = rng_for(0, "bench");
    let labels: Vec<u8> = (0..128).map(|_| rng.gen_range(0..10)).collect();
    let config = RevNetConfig {
        in_channels: 1,
        size: 32,
        levels: 3,
        steps: 4,
        hidden: 64,
        coupling: CouplingKind::Additive,
        permutation: Permutation::Reverse,
        dropout: 0.1,
        classes: 10,
        permutation_seed: 0,
    };
    let mut model = FiRevNet::new(&dev, config, &mut rng);
    let x: T2 = dev.tensor_from_vec(
        (0..1024 * 128).map(|_| rng.gen_range(-1.0..1.0)).collect(),
        (1024, 128),
    );
    let mut optim = Optimizer::new(OptimizerKind::Adamax, &dev, &model);
    let mut drop_rng = rng_for(0, "d");
    for it in 0..5 {
        let t0 = Instant::now();
        let out = model.forward(x.clone().leaky_traced(), Some(&mut drop_rng));
        let t1 = Instant::now();
        let loss =
            cross_entropy(model.logits(out.z), &labels) + (out.logp + out.logdet).sum() * 0.001;
        let t2 = Instant::now();
        let grads = loss.backward();
        let t3 = Instant::now();
        optim.update(&mut model, &grads, 1e-3);
        drop(grads);
        dev.empty_cache();
        let t4 = Instant::now();
        if it > 1 {
            println!(
                "flow fwd {:?} loss {:?} bwd {:?} opt {:?}",
                t1 - t0,
                t2 - t1,
                t3 - t2,
                t4 - t3
            );
        }
    }
}
