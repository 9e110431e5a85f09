//! `repro show STAGE` and `repro export STAGE DIR` on the smoke pipeline: the outputs of the
//! stage's *current* key, never an older build's; whole files, hard-linked or copied.

mod common;

use std::path::Path;

use common::{stderr, Sandbox};

/// Files in `dir` (recursively), relative, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(
                listing(&path)
                    .into_iter()
                    .map(|p| format!("{}/{p}", path.file_name().unwrap().to_string_lossy())),
            );
        } else {
            out.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

#[test]
fn show_lists_the_current_outputs_and_export_copies_them_whole() {
    let sb = Sandbox::new();

    // Not built yet: exit 1, saying so and how to build it; export creates nothing.
    let out = sb.repro(&["show", "train_ce"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not built under profile smoke"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("run train_ce"));
    let out = sb.repro(&["export", "train_ce", "out"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!sb.path("out").exists(), "nothing is exported");

    // Unknown stage: a pipeline mistake, exit 2.
    assert_eq!(sb.repro(&["show", "nope"]).status.code(), Some(2));
    assert_eq!(sb.repro(&["export", "nope", "out"]).status.code(), Some(2));

    sb.ok(&["run", "train_ce"]);
    let manifest = sb.last_manifest("train_ce");
    let key = manifest["key"].as_str().unwrap();
    let shown = sb.ok(&["show", "train_ce"]);
    assert!(shown.contains(&format!("key {key}")), "{shown}");
    let outputs = manifest["outputs"].as_object().unwrap();
    assert!(outputs.contains_key("weights.safetensors"));
    for (name, output) in outputs {
        let hash = output["hash"].as_str().unwrap();
        let bytes = output["bytes"].as_u64().unwrap();
        let line = shown
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} is not listed:\n{shown}"));
        assert!(line.contains(&format!(" {bytes} bytes")), "{line}");
        let path = line.split_whitespace().last().unwrap();
        assert!(path.ends_with(hash), "{line}");
        assert_eq!(
            std::fs::metadata(sb.path(path)).unwrap().len(),
            bytes,
            "the listed path is the object"
        );
    }

    // Export into a directory that does not exist yet; again into the same one.
    for _ in 0..2 {
        let printed = sb.ok(&["export", "train_ce", "exported/ce"]);
        assert_eq!(printed.lines().count(), outputs.len());
        let mut names: Vec<String> = outputs.keys().cloned().collect();
        names.sort();
        assert_eq!(
            listing(&sb.path("exported/ce")),
            names,
            "exactly the outputs, no temporary files"
        );
        for (name, output) in outputs {
            let exported = std::fs::read(sb.path(&format!("exported/ce/{name}"))).unwrap();
            let object = std::fs::read(sb.path(&format!(
                "artifacts/store/objects/{}",
                output["hash"].as_str().unwrap()
            )))
            .unwrap();
            assert!(exported == object, "{name} is the object's bytes");
            let meta = std::fs::metadata(sb.path(&format!("exported/ce/{name}"))).unwrap();
            assert!(
                meta.permissions().readonly(),
                "{name} shares the store's bytes"
            );
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                assert!(meta.nlink() >= 2, "{name} is a hard link into the store");
            }
        }
    }
    // The verify pass still holds: exporting did not touch the objects.
    sb.ok(&["verify"]);

    // Another parameter value is another key: not built, even though an older build exists.
    let out = sb.repro(&["--set", "train_ce.epochs=2", "show", "train_ce"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("epochs"),
        "the reason names the change"
    );
    let out = sb.repro(&["--set", "train_ce.epochs=2", "export", "train_ce", "other"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!sb.path("other").exists());

    // A corrupt object is not exported: the error names it and the way to rebuild it.
    let hash = outputs["weights.safetensors"]["hash"].as_str().unwrap();
    let object = sb.path(&format!("artifacts/store/objects/{hash}"));
    let mut permissions = std::fs::metadata(&object).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    permissions.set_readonly(false);
    std::fs::set_permissions(&object, permissions).unwrap();
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let out = sb.repro(&["export", "train_ce", "corrupt"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(hash) && stderr(&out).contains("--repair"),
        "{}",
        stderr(&out)
    );
    assert!(!sb.path("corrupt/weights.safetensors").exists());
}
