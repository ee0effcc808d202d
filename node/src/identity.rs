//! The node's identity: an Ed25519 key created on first run in the data
//! directory (file mode 0600) and reused after. Its `NodeId` is the SHA-256
//! of the public key.
//!
//! The data directory is `--data-dir`, else `$HYPHA_HOME`, else
//! `$XDG_DATA_HOME/hypha`, else `~/.local/share/hypha`; each node on a
//! machine gets its own, so several run side by side.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use hypha_wire::NodeId;

/// File holding the 32-byte secret key seed, hex encoded.
pub const KEY_FILE: &str = "identity.key";

/// Errors reading or creating an identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("no data directory: pass --data-dir or set HYPHA_HOME")]
    NoDataDir,
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a hypha key (expected 64 hex digits)")]
    BadKey { path: PathBuf },
    #[error("the system random source failed")]
    Random,
}

/// A node's signing key and the id derived from it.
pub struct Identity {
    key: SigningKey,
    id: NodeId,
}

impl Identity {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let id = node_id_of(&key.verifying_key().to_bytes());
        Self { key, id }
    }

    /// The first key derived from `seed` whose id carries `bits` of proof
    /// of work (deterministic: for tests and reproducible set-ups).
    pub fn from_seed_with_pow(seed: [u8; 32], bits: u32) -> Self {
        let mut candidate = seed;
        loop {
            let ident = Self::from_seed(candidate);
            if ident.pow_bits() >= bits {
                return ident;
            }
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(b"hypha-pow-seed");
            ctx.update(&candidate);
            candidate.copy_from_slice(ctx.finish().as_ref());
        }
    }

    /// A fresh random key whose id carries `bits` of proof of work.
    pub fn generate(bits: u32) -> Result<Self, IdentityError> {
        let rng = ring::rand::SystemRandom::new();
        loop {
            let mut seed = [0u8; 32];
            ring::rand::SecureRandom::fill(&rng, &mut seed).map_err(|_| IdentityError::Random)?;
            let ident = Self::from_seed(seed);
            if ident.pow_bits() >= bits {
                return Ok(ident);
            }
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Leading zero bits of SHA-256("hypha-pow" || id): what creating this
    /// key cost (see `hypha_ledger::pow_bits`).
    pub fn pow_bits(&self) -> u32 {
        hypha_ledger::pow_bits(&self.id)
    }

    fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Loads the key in `dir`, creating the directory and a new key (mode
    /// 0600) on first use.
    /// [`Identity::load_or_create_with_pow`] at the default difficulty.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        Self::load_or_create_with_pow(dir, hypha_ledger::DEFAULT_POW_BITS)
    }

    /// Loads the key in `dir`, or creates one whose id carries `pow_bits`
    /// of proof of work (about 2^pow_bits key generations).
    pub fn load_or_create_with_pow(dir: &Path, pow_bits: u32) -> Result<Self, IdentityError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let seed = parse_hex32(text.trim()).ok_or(IdentityError::BadKey { path })?;
                Ok(Self::from_seed(seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let started = std::time::Instant::now();
                let seed = Self::generate(pow_bits)?.seed();
                tracing::info!(
                    pow_bits,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "proof of work for a new identity"
                );
                // Write to a private temporary file, then rename: a crash
                // never leaves a half-written key behind.
                let tmp = dir.join(format!("{KEY_FILE}.tmp"));
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&tmp).map_err(io(&tmp))?;
                let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
                f.write_all(format!("{hex}\n").as_bytes())
                    .map_err(io(&tmp))?;
                f.sync_all().map_err(io(&tmp))?;
                std::fs::rename(&tmp, &path).map_err(io(&path))?;
                // The rename is durable only once the directory is: without
                // this a power cut could bring back a node with no key (and
                // a new identity) after it had already served as this one.
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(dir))?;
                tracing::info!(path = %path.display(), "created a new node identity");
                Ok(Self::from_seed(seed))
            }
            Err(e) => Err(IdentityError::Io { path, source: e }),
        }
    }
}

/// SHA-256 of an Ed25519 public key.
pub fn node_id_of(public_key: &[u8; 32]) -> NodeId {
    hypha_ledger::node_id_of(public_key)
}

/// The data directory: `explicit`, else `$HYPHA_HOME`, else the XDG data
/// directory.
pub fn data_dir(explicit: Option<&Path>) -> Result<PathBuf, IdentityError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("HYPHA_HOME") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(p).join("hypha"));
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local").join("share").join("hypha"))
        .ok_or(IdentityError::NoDataDir)
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    s.parse::<NodeId>().ok().map(|n| n.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_sha256_of_the_public_key() {
        let ident = Identity::from_seed([1; 32]);
        let digest = ring::digest::digest(&ring::digest::SHA256, &ident.public_key());
        assert_eq!(ident.id().as_bytes().as_slice(), digest.as_ref());
    }
}
