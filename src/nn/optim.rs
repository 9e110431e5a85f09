//! Adam and Adamax over a model's parameter list, written with dfdx tensor ops (so the same
//! code runs on CPU and CUDA). dfdx's own `Adam` needs compile-time shapes, ours are runtime.
//! Formulas as in PyTorch (`torch.optim.Adam` / `Adamax`, no weight decay).

use serde::{Deserialize, Serialize};

use super::{Dev, Grads, HasParams, Param, T2};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Adamax,
}

/// Optimiser state: first moments `m` and second moments (Adam) or infinity norms (Adamax).
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Steps taken so far (for bias correction).
    pub step: u64,
    pub m: Vec<Param>,
    pub v: Vec<Param>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, dev: &Dev, model: &impl HasParams) -> Optimizer {
        let zeros = |prefix: &str| {
            model
                .params()
                .iter()
                .map(|p| Param::zeros(dev, format!("{prefix}.{}", p.name), &p.shape))
                .collect()
        };
        Optimizer {
            kind,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            m: zeros("optim.m"),
            v: zeros("optim.v"),
        }
    }

    /// One update with learning rate `lr`. Every parameter must have a gradient in `grads`
    /// (a loss that does not reach a parameter is a bug in the objective, and panics).
    pub fn update(&mut self, model: &mut impl HasParams, grads: &Grads, lr: f32) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let correction1 = 1.0 - b1.powi(t);
        let correction2 = 1.0 - b2.powi(t);
        let mut i = 0;
        let kind = self.kind;
        let (ms, vs) = (&mut self.m, &mut self.v);
        model.visit_mut(&mut |p| {
            let g: T2 = grads.get(&p.value);
            let m = ms[i].value.clone() * b1 + g.clone() * (1.0 - b1);
            let (v, update) = match kind {
                OptimizerKind::Adam => {
                    let v = vs[i].value.clone() * b2 + g.square() * (1.0 - b2);
                    let denom = (v.clone() / correction2).sqrt() + eps;
                    (v, (m.clone() / correction1) / denom * lr)
                }
                OptimizerKind::Adamax => {
                    let v = (vs[i].value.clone() * b2).maximum(g.abs() + eps);
                    (v.clone(), m.clone() / v * (lr / correction1))
                }
            };
            p.value = p.value.clone() - update;
            ms[i].value = m;
            vs[i].value = v;
            i += 1;
        });
    }
}

impl HasParams for Optimizer {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.m.iter().chain(&self.v).for_each(f);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.m.iter_mut().chain(self.v.iter_mut()).for_each(f);
    }
}
