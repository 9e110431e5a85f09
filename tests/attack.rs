//! The `attack` and `knn` stages end to end on the `smoke` profile: the same seed gives the
//! same bytes in two separate stores; another seed draws other pairs.

mod common;

use common::Sandbox;

fn outputs(sb: &Sandbox, stage: &str) -> serde_json::Value {
    sb.last_manifest(stage)["outputs"].clone()
}

#[test]
fn attack_stages_are_deterministic_for_a_seed() {
    let (first, second) = (Sandbox::new(), Sandbox::new());
    for sb in [&first, &second] {
        sb.ok(&["run", "invariance_cnn"]);
        sb.ok(&["run", "pgd_ce"]);
    }
    for stage in ["knn", "invariance_cnn", "pgd_ce"] {
        let (a, b) = (outputs(&first, stage), outputs(&second, stage));
        assert!(a.as_object().is_some_and(|o| !o.is_empty()), "{stage}: {a}");
        assert_eq!(a, b, "{stage}: two stores, the same key, different bytes");
    }
    for name in [
        "invariance.json",
        "examples.json",
        "adversarial.npy",
        "pairs.png",
    ] {
        assert!(
            outputs(&first, "invariance_cnn")[name].is_object(),
            "invariance_cnn lacks {name}"
        );
    }
    for name in [
        "pgd.json",
        "examples.json",
        "adversarial.npy",
        "curve.svg",
        "examples.png",
    ] {
        assert!(
            outputs(&first, "pgd_ce")[name].is_object(),
            "pgd_ce lacks {name}"
        );
    }

    // Another seed: other pairs, so other per-example results.
    let before = outputs(&first, "invariance_cnn");
    first.ok(&["--set", "invariance_cnn.seed=1", "run", "invariance_cnn"]);
    let after = outputs(&first, "invariance_cnn");
    assert_ne!(before["examples.json"], after["examples.json"]);
}
