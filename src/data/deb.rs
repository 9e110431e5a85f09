//! Debian packages (`.deb`) as a pinned data source, read without installing them.
//!
//! A package is fetched into the download cache (`<cache>/debian/`) with the ordinary Debian
//! client, `apt-get download PACKAGE=VERSION` (no root needed), or, when that is missing or
//! fails, from the Debian pool with `curl`. It is unpacked in Rust: a `.deb` is an `ar`
//! archive of `debian-binary` (the format version), `control.tar.*` (metadata) and
//! `data.tar.*` (the files it would install); we read members of `data.tar.xz` (or `.gz`, or
//! uncompressed). The package and every member read are checked against pinned SHA-256s; a
//! mismatch is an error naming the file, the expected and the actual hash, and a download
//! enters the cache only once it matches.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::mnist::{cache_dir, check_hash};

/// Debian's main archive: `pool/main/<prefix>/<source package>/<file>` keeps every released
/// `.deb` under a stable address.
pub const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// A Debian package pinned by version and hash, and the files to read from it.
#[derive(Clone, Debug)]
pub struct PinnedDeb {
    /// Binary package name, e.g. `dataset-fashion-mnist`.
    pub package: String,
    /// Exact Debian version, as `apt-get download PACKAGE=VERSION` takes it.
    pub version: String,
    /// File name of the `.deb`, as apt-get saves it and the pool serves it.
    pub deb: String,
    pub deb_sha256: String,
    /// Files read from the package's `data.tar`, in the order they are returned.
    pub members: Vec<PinnedMember>,
}

/// One file inside a package and its pinned hash.
#[derive(Clone, Debug)]
pub struct PinnedMember {
    /// Path inside the package, e.g. `usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz`
    /// (a leading `./` or `/` does not matter).
    pub path: String,
    pub sha256: String,
}

/// The pool address of a `.deb`. Pool directories are named by source package; this assumes it
/// equals the binary package's name (true of `dataset-fashion-mnist`).
pub fn pool_url(package: &str, deb: &str) -> String {
    // Libraries are filed under "lib" plus their next letter, everything else under its first.
    let prefix = if package.starts_with("lib") && package.len() > 3 {
        &package[..4]
    } else {
        &package[..1.min(package.len())]
    };
    format!("{DEBIAN_MIRROR}/pool/main/{prefix}/{package}/{deb}")
}

/// The pinned `.deb` from the cache, downloading it when it is absent or does not match its
/// hash. `alternatives` is appended to the error when no download worked (how to do without).
pub fn fetch(
    source: &PinnedDeb,
    alternatives: &str,
    log: &mut dyn FnMut(String),
) -> Result<PathBuf> {
    let dir = cache_dir().join("debian");
    let path = dir.join(&source.deb);
    if let Ok(bytes) = std::fs::read(&path) {
        if check_hash(&path, &bytes, &source.deb_sha256).is_ok() {
            return Ok(path);
        }
        log(format!(
            "cached {} does not match its pinned hash; downloading it again",
            path.display()
        ));
    }
    fs_err::create_dir_all(&dir).with_context(|| format!("creating cache {}", dir.display()))?;
    // Each download gets a directory of its own, so that concurrent fetches (parallel tests,
    // two runs) never see each other's partial files, and only a verified file is renamed
    // to the final name.
    static DOWNLOADS: AtomicUsize = AtomicUsize::new(0);
    let download = dir.join(format!(
        "download-{}-{}",
        std::process::id(),
        DOWNLOADS.fetch_add(1, Ordering::Relaxed)
    ));
    fs_err::create_dir_all(&download)?;
    let result = download_into(&download, source, alternatives, log).and_then(|(fetched, how)| {
        let bytes = fs_err::read(&fetched)?;
        check_hash(&fetched, &bytes, &source.deb_sha256).with_context(|| {
            format!("{how} gave a file that is not the pinned package; nothing was cached")
        })?;
        fs_err::rename(&fetched, &path)?;
        Ok(path.clone())
    });
    let _ = std::fs::remove_dir_all(&download);
    result
}

/// Downloads the `.deb` into `download` with apt-get, else curl; returns the file and the
/// command that made it.
fn download_into(
    download: &Path,
    source: &PinnedDeb,
    alternatives: &str,
    log: &mut dyn FnMut(String),
) -> Result<(PathBuf, String)> {
    let fetched = download.join(&source.deb);
    let spec = format!("{}={}", source.package, source.version);
    let apt = format!("`apt-get download {spec}`");
    log(format!("apt-get download {spec}"));
    let apt_failure = match Command::new("apt-get")
        .args(["download", "-q", &spec])
        .current_dir(download)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() && fetched.is_file() => return Ok((fetched, apt)),
        Ok(out) if out.status.success() => {
            format!("succeeded but saved no {}", source.deb)
        }
        Ok(out) => failure(&out),
        Err(e) => format!("could not be run ({e})"),
    };
    let url = pool_url(&source.package, &source.deb);
    log(format!(
        "{apt} {apt_failure}; trying the Debian pool: curl -fsSL {url}"
    ));
    // apt-get may have left a partial file under the final name.
    let _ = std::fs::remove_file(&fetched);
    let curl = format!("`curl -fsSL {url}`");
    let curl_failure = match Command::new("curl")
        .args(["-fsSL", "--retry", "2", "-o"])
        .arg(&fetched)
        .arg(&url)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() && fetched.is_file() => return Ok((fetched, curl)),
        Ok(out) if out.status.success() => format!("succeeded but saved no {}", source.deb),
        Ok(out) => failure(&out),
        Err(e) => format!("could not be run ({e})"),
    };
    bail!(
        "could not download {} (Debian package {spec}): {apt} {apt_failure}; {curl} {curl_failure}. {alternatives}",
        source.deb
    )
}

/// "failed (exit status): last lines of stderr".
fn failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    // The end of the message says why; a whole apt log would drown the rest of the error.
    let tail: String = stderr
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("failed ({}): {}", out.status, tail.replace('\n', " | "))
}

/// A member path as compared: without a leading `./` or `/`.
fn normalise(path: &str) -> &str {
    path.trim_start_matches("./").trim_start_matches('/')
}

/// The pinned members of the `.deb` at `archive`, with the package's and every member's hash
/// checked, as (`<archive>/<member path>`, bytes) in the order of `source.members`.
pub fn read_members(archive: &Path, source: &PinnedDeb) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let bytes = fs_err::read(archive)?;
    check_hash(archive, &bytes, &source.deb_sha256)?;
    let wanted: Vec<&str> = source.members.iter().map(|m| m.path.as_str()).collect();
    data_members(archive, &bytes, &wanted)?
        .into_iter()
        .zip(&source.members)
        .map(|(bytes, member)| {
            let name = archive.join(normalise(&member.path));
            check_hash(&name, &bytes, &member.sha256)?;
            Ok((name, bytes))
        })
        .collect()
}

/// The files `wanted` (paths inside the package) from a `.deb`'s `data.tar.*`, in the order
/// asked. `name` names the `.deb` in errors. No hash is checked here.
pub fn data_members(name: &Path, deb: &[u8], wanted: &[&str]) -> Result<Vec<Vec<u8>>> {
    let (member, compressed) = data_tar(name, deb)?;
    let what = name.join(&member);
    let tar = decompress(&what, &member, compressed)?;
    tar_members(&what, &tar, wanted)
}

/// The `data.tar.*` member of a `.deb`: (its name, its bytes).
fn data_tar(name: &Path, deb: &[u8]) -> Result<(String, Vec<u8>)> {
    ensure!(
        deb.starts_with(b"!<arch>\n"),
        "{}: not a Debian package (no `!<arch>` ar header; {} bytes)",
        name.display(),
        deb.len()
    );
    let unreadable = || {
        format!(
            "{}: not a readable ar archive (truncated or corrupt?)",
            name.display()
        )
    };
    let mut archive = ar::Archive::new(deb);
    let mut index = 0;
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.with_context(unreadable)?;
        // GNU ar ends member names with '/'; dpkg-deb does not.
        let member = String::from_utf8_lossy(entry.header().identifier())
            .trim_end_matches('/')
            .to_string();
        let size = entry.header().size();
        let wanted = index == 0 || member.starts_with("data.tar");
        index += 1;
        if !wanted {
            continue;
        }
        // A corrupt header may claim any size: never reserve more than the file holds.
        let mut bytes = Vec::with_capacity(size.min(deb.len() as u64) as usize);
        entry.read_to_end(&mut bytes).with_context(unreadable)?;
        ensure!(
            bytes.len() as u64 == size,
            "{}: member {member} is truncated ({} of {size} bytes)",
            name.display(),
            bytes.len()
        );
        if index == 1 {
            ensure!(
                member == "debian-binary" && bytes.starts_with(b"2."),
                "{}: not a Debian package (first member is {member:?}, not debian-binary 2.x)",
                name.display()
            );
        } else {
            return Ok((member, bytes));
        }
    }
    bail!(
        "{}: has no data.tar member (truncated, or not a binary package?)",
        name.display()
    )
}

/// `data.tar`'s bytes, decompressed according to its member name.
fn decompress(what: &Path, member: &str, compressed: Vec<u8>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match member {
        "data.tar" => return Ok(compressed),
        "data.tar.xz" => lzma_rs::xz_decompress(&mut &compressed[..], &mut out).map_err(|e| {
            anyhow!(
                "{}: not valid xz data (truncated or corrupt?): {e}",
                what.display()
            )
        })?,
        "data.tar.gz" => {
            flate2::read::GzDecoder::new(&compressed[..])
                .read_to_end(&mut out)
                .with_context(|| {
                    format!(
                        "{}: not valid gzip data (truncated or corrupt?)",
                        what.display()
                    )
                })?;
        }
        other => bail!(
            "{}: {other} is compressed in a way we do not read (we read data.tar, .xz and .gz)",
            what.display()
        ),
    }
    Ok(out)
}

/// The regular files `wanted` from a tar archive, in the order asked.
fn tar_members(what: &Path, tar: &[u8], wanted: &[&str]) -> Result<Vec<Vec<u8>>> {
    let unreadable = || {
        format!(
            "{}: not a readable tar archive (truncated or corrupt?)",
            what.display()
        )
    };
    let mut found: Vec<Option<Vec<u8>>> = vec![None; wanted.len()];
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().with_context(unreadable)? {
        let mut entry = entry.with_context(unreadable)?;
        let path = entry.path().with_context(unreadable)?;
        let path = path.to_string_lossy();
        let Some(i) = wanted.iter().position(|w| normalise(w) == normalise(&path)) else {
            continue;
        };
        ensure!(
            entry.header().entry_type().is_file(),
            "{}: member {} is not a regular file",
            what.display(),
            wanted[i]
        );
        let size = entry.size();
        let mut bytes = Vec::with_capacity(size.min(tar.len() as u64) as usize);
        entry.read_to_end(&mut bytes).with_context(unreadable)?;
        ensure!(
            bytes.len() as u64 == size,
            "{}: member {} is truncated ({} of {size} bytes)",
            what.display(),
            wanted[i],
            bytes.len()
        );
        found[i] = Some(bytes);
    }
    found
        .into_iter()
        .zip(wanted)
        .map(|(bytes, w)| bytes.with_context(|| format!("{}: has no member {w}", what.display())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(bytes: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    /// A tar archive of regular files, laid out as dpkg-deb does (`./`-prefixed paths).
    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, bytes) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, path, *bytes).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn xz(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        lzma_rs::xz_compress(&mut &bytes[..], &mut out).unwrap();
        out
    }

    /// A tiny but well-formed `.deb` whose `data_member` holds `files`.
    fn deb_of(data_member: &str, data: Vec<u8>) -> Vec<u8> {
        let control = xz(&tar_of(&[("./control", b"Package: tiny\n")]));
        let mut builder = ar::Builder::new(Vec::new());
        for (name, bytes) in [
            ("debian-binary", b"2.0\n".to_vec()),
            ("control.tar.xz", control),
            (data_member, data),
        ] {
            let header = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
            builder.append(&header, &bytes[..]).unwrap();
        }
        builder.into_inner().unwrap()
    }

    const A: &[u8] = b"first file\n";
    const B: &[u8] = &[
        0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    fn tiny_deb() -> Vec<u8> {
        deb_of(
            "data.tar.xz",
            xz(&tar_of(&[
                ("./usr/share/tiny/a.txt", A),
                ("./usr/share/tiny/b.gz", B),
            ])),
        )
    }

    #[test]
    fn deb_members_come_back_in_the_order_asked_whatever_the_prefix() {
        let deb = tiny_deb();
        let got = data_members(
            Path::new("tiny.deb"),
            &deb,
            &["usr/share/tiny/b.gz", "/usr/share/tiny/a.txt"],
        )
        .unwrap();
        assert_eq!(got, vec![B.to_vec(), A.to_vec()]);
        // data.tar may also be gzip-compressed or plain.
        let tar = tar_of(&[("./usr/share/tiny/a.txt", A)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        for deb in [
            deb_of("data.tar.gz", gz.finish().unwrap()),
            deb_of("data.tar", tar),
        ] {
            let got = data_members(Path::new("t.deb"), &deb, &["./usr/share/tiny/a.txt"]);
            assert_eq!(got.unwrap(), vec![A.to_vec()]);
        }
    }

    #[test]
    fn deb_truncated_anywhere_is_an_error_naming_the_file() {
        let deb = tiny_deb();
        let name = Path::new("/cache/debian/tiny.deb");
        for cut in [
            0,
            5,
            8,
            30,
            70,
            100,
            deb.len() / 2,
            deb.len() - 40,
            deb.len() - 1,
        ] {
            let err = data_members(name, &deb[..cut], &["usr/share/tiny/a.txt"])
                .expect_err(&format!("cut at {cut} of {}", deb.len()));
            let err = format!("{err:#}");
            assert!(
                err.contains("/cache/debian/tiny.deb"),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn deb_with_corrupt_data_tar_names_the_member() {
        let deb = tiny_deb();
        // data.tar.xz is the last member: the last xz magic starts it.
        let magic = b"\xfd7zXZ\0";
        let start = (0..deb.len() - magic.len())
            .rev()
            .find(|&i| deb[i..].starts_with(magic))
            .unwrap();
        // A damaged xz header, and damage inside the stream (in the first tar header).
        for at in [start + 2, start + 100] {
            let mut corrupt = deb.clone();
            corrupt[at] ^= 0xff;
            let err = data_members(Path::new("tiny.deb"), &corrupt, &["usr/share/tiny/a.txt"])
                .expect_err(&format!("damage at {at}"));
            let err = format!("{err:#}");
            assert!(err.contains("tiny.deb/data.tar.xz"), "{err}");
        }
    }

    #[test]
    fn deb_that_is_not_one_or_lacks_a_member_is_refused_plainly() {
        let err = data_members(Path::new("x.deb"), b"PK\x03\x04 a zip", &["a"]).unwrap_err();
        assert!(
            err.to_string().contains("x.deb: not a Debian package"),
            "{err}"
        );

        let mut builder = ar::Builder::new(Vec::new());
        builder
            .append(&ar::Header::new(b"other".to_vec(), 2), &b"hi"[..])
            .unwrap();
        let err =
            data_members(Path::new("x.deb"), &builder.into_inner().unwrap(), &["a"]).unwrap_err();
        assert!(err.to_string().contains("not debian-binary"), "{err}");

        let err = data_members(Path::new("t.deb"), &tiny_deb(), &["usr/share/tiny/c"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("t.deb/data.tar.xz: has no member usr/share/tiny/c"),
            "{err}"
        );
    }

    #[test]
    fn deb_read_members_checks_the_package_and_every_member_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny_1.0_all.deb");
        let deb = tiny_deb();
        std::fs::write(&path, &deb).unwrap();
        let mut source = PinnedDeb {
            package: "tiny".into(),
            version: "1.0".into(),
            deb: "tiny_1.0_all.deb".into(),
            deb_sha256: sha256(&deb),
            members: vec![
                PinnedMember {
                    path: "usr/share/tiny/a.txt".into(),
                    sha256: sha256(A),
                },
                PinnedMember {
                    path: "./usr/share/tiny/b.gz".into(),
                    sha256: sha256(B),
                },
            ],
        };
        let got = read_members(&path, &source).unwrap();
        assert_eq!(got[0], (path.join("usr/share/tiny/a.txt"), A.to_vec()));
        assert_eq!(got[1].1, B);

        source.members[1].sha256 = "0".repeat(64);
        let err = read_members(&path, &source).unwrap_err().to_string();
        assert!(
            err.contains("tiny_1.0_all.deb/usr/share/tiny/b.gz")
                && err.contains(&"0".repeat(64))
                && err.contains(&sha256(B)),
            "{err}"
        );

        source.deb_sha256 = "1".repeat(64);
        let err = read_members(&path, &source).unwrap_err().to_string();
        assert!(
            err.contains("tiny_1.0_all.deb")
                && err.contains(&"1".repeat(64))
                && err.contains(&sha256(&deb)),
            "{err}"
        );
    }

    #[test]
    fn deb_pool_url_follows_debian_layout() {
        assert_eq!(
            pool_url("dataset-fashion-mnist", "x_1_all.deb"),
            "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/x_1_all.deb"
        );
        assert_eq!(
            pool_url("libfoo", "libfoo_1_amd64.deb"),
            "http://deb.debian.org/debian/pool/main/libf/libfoo/libfoo_1_amd64.deb"
        );
    }
}
