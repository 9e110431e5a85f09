//! The adversarial-spheres stages end to end on the `smoke` profile: every output is there, the
//! JSON contracts parse, the metamers keep their source's logits, and the same seed gives the
//! same bytes in two separate stores while another seed draws other spheres.

mod common;

use common::Sandbox;
use repro::outputs::{parse_json, MisalignedResult, SpheresFlowResult, SpheresSummary};

fn outputs(sb: &Sandbox, stage: &str) -> serde_json::Value {
    sb.last_manifest(stage)["outputs"].clone()
}

/// The bytes of output `name` of `stage`'s last build.
fn output(sb: &Sandbox, stage: &str, name: &str) -> Vec<u8> {
    let hash = outputs(sb, stage)[name]["hash"]
        .as_str()
        .unwrap_or_else(|| panic!("{stage} has no output {name}"))
        .to_string();
    std::fs::read(sb.path(&format!("artifacts/store/objects/{hash}"))).unwrap()
}

#[test]
fn spheres_stages_run_and_are_deterministic_for_a_seed() {
    let (first, second) = (Sandbox::new(), Sandbox::new());
    for sb in [&first, &second] {
        for stage in ["spheres_ce", "spheres_ice", "spheres_misaligned"] {
            sb.ok(&["run", stage]);
        }
    }
    for stage in ["spheres", "spheres_ce", "spheres_ice", "spheres_misaligned"] {
        let (a, b) = (outputs(&first, stage), outputs(&second, stage));
        assert!(a.as_object().is_some_and(|o| !o.is_empty()), "{stage}: {a}");
        assert_eq!(a, b, "{stage}: two stores, the same key, different bytes");
    }

    let summary: SpheresSummary =
        parse_json(&output(&first, "spheres", "summary.json"), "summary.json").unwrap();
    assert_eq!(
        (summary.d, summary.r_inner, summary.r_outer),
        (100, 1.0, 10.0)
    );
    assert!(summary.max_relative_radius_error < 1e-6);
    assert!(summary.train.inner.abs_diff(summary.train.outer) <= 1);

    for stage in ["spheres_ce", "spheres_ice"] {
        let result: SpheresFlowResult =
            parse_json(&output(&first, stage, "spheres.json"), "spheres.json").unwrap();
        for file in &result.figures {
            assert!(
                outputs(&first, stage)[file].is_object(),
                "{stage} lacks {file}"
            );
        }
        assert!(outputs(&first, stage)["weights.safetensors"].is_object());
        let m = &result.metamers;
        assert_eq!(m.fraction_same_decision_as_logit_source, 1.0, "{stage}");
        assert!(m.max_logit_diff < 1e-4, "{stage}: {}", m.max_logit_diff);
        assert_eq!(result.heatmaps.panels.len(), 4);
        let png = output(&first, stage, "heatmaps.png");
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(
            stage == "spheres_ice",
            result.nuisance.adversary_test.is_some()
        );
    }

    let misaligned: MisalignedResult = parse_json(
        &output(&first, "spheres_misaligned", "misaligned.json"),
        "misaligned.json",
    )
    .unwrap();
    assert_eq!(misaligned.ignored_coordinate, 99);
    assert_eq!(misaligned.n_moved, summary.test.inner);
    assert!(misaligned.moved_max_relative_radius_error < 1e-6);

    // Another seed: other spheres.
    let before = outputs(&first, "spheres");
    first.ok(&["--set", "spheres.seed=1", "run", "spheres"]);
    assert_ne!(
        before["train_x.npy"],
        outputs(&first, "spheres")["train_x.npy"]
    );
}
