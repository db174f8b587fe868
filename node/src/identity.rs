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
            // Our own file, made afresh with the owner-only mode (an old one would keep its own).
            let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            {
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
            }
            // Into place only if no other start on this data directory got there first: a link
            // fails where a rename would replace that one's key, leaving it running under an
            // identity no longer on disk. The key there is then ours too.
            let placed = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match placed {
                Ok(()) => Ok(key),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(path),
                Err(e) => Err(anyhow::anyhow!("writing identity {}: {e}", path.display())),
            }
        }
        Err(e) => Err(anyhow::anyhow!("reading identity {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_readable_by_its_owner_only_and_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("identity");
        // A file left by an earlier start that died, readable by everyone.
        let leftover = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&leftover, b"junk").expect("write");
        let made = load_or_create(&path).expect("made");
        assert!(!leftover.exists(), "the leftover is gone");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by its owner only: {mode:o}");
        }
        let again = load_or_create(&path).expect("loaded");
        assert_eq!(made.public().to_peer_id(), again.public().to_peer_id());
        // A file that is no identity is not replaced: the error says what to do.
        std::fs::write(&path, b"not a key").expect("write");
        let e = load_or_create(&path).expect_err("refused");
        assert!(e.to_string().contains("move it away"), "{e}");
    }
}
