//! A real S3-compatible server for the shared store's tests and benchmark: moto's server mode
//! (`moto_server`, installed from PyPI by `moto_env.sh` into a venv of its own), listening on
//! 127.0.0.1 at a free port, with one bucket; the process is killed when this is dropped.
//!
//! Why moto: MinIO's server ships only from its own site, which CI cannot reach; the `s3s-fs`
//! crate would add minutes of compilation to every CI run. moto installs from PyPI in seconds,
//! speaks the S3 REST API object_store uses (path-style, SigV4), and honours conditional
//! writes (`If-None-Match: *` answered with 412), which the manifest protocol needs.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct S3Server {
    child: Child,
    bin: PathBuf,
    pub endpoint: String,
    pub bucket: String,
}

impl S3Server {
    /// Installs (if needed) and starts the server with bucket `repro-test`; `Err` says why it
    /// cannot (the caller skips, printing it).
    pub fn start() -> Result<S3Server, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/moto_env.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "moto's S3 server could not be installed from PyPI ({} failed)",
                script.display()
            ));
        }
        let bin = PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .trim(),
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?
            .port();
        let child = Command::new(bin.join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting moto_server: {e}"))?;
        let server = S3Server {
            child,
            bin,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "repro-test".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("moto_server did not listen on port {port} in 30 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        server.boto(&format!("s3.create_bucket(Bucket={:?})", server.bucket));
        Ok(server)
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The environment `repro` needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, &Path)> {
        vec![
            ("AWS_ENDPOINT_URL", Path::new(&self.endpoint)),
            ("AWS_ACCESS_KEY_ID", Path::new("repro-test")),
            ("AWS_SECRET_ACCESS_KEY", Path::new("repro-test")),
            ("AWS_REGION", Path::new("us-east-1")),
        ]
    }

    /// Runs Python with boto3's client for this server as `s3`, and returns its stdout; panics
    /// with its stderr on failure. The tests use it to reach behind `repro` (flip a byte, list).
    pub fn boto(&self, code: &str) -> String {
        let program = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url={:?}, aws_access_key_id='repro-test', \
             aws_secret_access_key='repro-test', region_name='us-east-1')\n{code}\n",
            self.endpoint
        );
        let out = Command::new(self.bin.join("python"))
            .args(["-c", &program])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boto3: {code}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The keys under `prefix` in the bucket, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let listed = self.boto(&format!(
            "p = s3.get_paginator('list_objects_v2')\n\
             for page in p.paginate(Bucket={:?}, Prefix={prefix:?}):\n    \
             [print(o['Key']) for o in page.get('Contents', [])]",
            self.bucket
        ));
        let mut keys: Vec<String> = listed.lines().map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// Flips one bit of the object at `key` (rewriting it in place, as damage would).
    pub fn flip_byte(&self, key: &str, offset: usize) {
        self.boto(&format!(
            "b = bytearray(s3.get_object(Bucket={bucket:?}, Key={key:?})['Body'].read())\n\
             b[{offset}] ^= 1\n\
             s3.put_object(Bucket={bucket:?}, Key={key:?}, Body=bytes(b))",
            bucket = self.bucket
        ));
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
