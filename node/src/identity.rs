//! The node's persistent ed25519 identity.

use std::io::Write;
use std::path::Path;

use libp2p::identity::Keypair;

/// Loads the keypair stored at `path`, or creates one there (readable by the owner only).
pub(crate) fn load_or_create(path: &Path) -> anyhow::Result<Keypair> {
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            anyhow::anyhow!("{} is not a Shoal identity ({e}); move it away to get a new one", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding()?;
            let tmp = path.with_extension("tmp");
            {
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, path)?;
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!("reading identity {}: {e}", path.display())),
    }
}
