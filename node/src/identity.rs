//! The node's persistent ed25519 identity.

use std::io::Write;
use std::path::Path;

use libp2p::identity::Keypair;

/// Loads the keypair stored at `path`, or creates one there (readable by the owner only).
pub(crate) fn load_or_create(path: &Path) -> anyhow::Result<Keypair> {
    match read(path)? {
        Some(key) => Ok(key),
        None => create(path),
    }
}

fn read(path: &Path) -> anyhow::Result<Option<Keypair>> {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the node's private key is readable by other users, who could act as this node; `chmod 600` it"
            );
        }
    }
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map(Some).map_err(|e| {
            anyhow::anyhow!("{} is not a Shoal identity ({e}); move it away to get a new one", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading identity {}: {e}", path.display())),
    }
}

fn create(path: &Path) -> anyhow::Result<Keypair> {
    let key = Keypair::generate_ed25519();
    let bytes = key.to_protobuf_encoding()?;
    // A name of our own, made afresh with the owner-only mode: a file left by another start
    // (another process, or a container with the same process id) is neither reused nor removed.
    let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let written = opts.open(&tmp).and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
        anyhow::Context::with_context(written, || format!("cannot write the node's identity to {}", tmp.display()))?;
    }
    // Into place only if no other first start on this data directory got there first: a link
    // fails where a rename would replace that one's key, leaving it running under an identity no
    // longer on disk. Where the file system has no links, a rename, as before.
    let placed = std::fs::hard_link(&tmp, path);
    let result = match placed {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read(path)? {
            // Another start's key: ours too.
            Some(theirs) => Ok(theirs),
            // Something that is no file, such as a dangling symlink.
            None => Err(anyhow::anyhow!("{} is in the way of the identity; move it away", path.display())),
        },
        Err(_) => std::fs::rename(&tmp, path)
            .map(|()| key)
            .map_err(|e| anyhow::anyhow!("writing identity {}: {e}", path.display())),
    };
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_readable_by_its_owner_only_and_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("identity");
        let made = load_or_create(&path).expect("made");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by its owner only: {mode:o}");
        }
        let again = load_or_create(&path).expect("loaded");
        assert_eq!(made.public().to_peer_id(), again.public().to_peer_id());
        let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("list").collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        // A file that is no identity is not replaced: the error says what to do.
        std::fs::write(&path, b"not a key").expect("write");
        let e = load_or_create(&path).expect_err("refused");
        assert!(e.to_string().contains("move it away"), "{e}");
    }

    /// Two first starts on one data directory: the one that places its key second takes the
    /// first one's, and never replaces it.
    #[test]
    fn a_start_that_comes_second_takes_the_key_already_placed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("identity");
        let first = create(&path).expect("first");
        let second = create(&path).expect("second");
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        assert_eq!(read(&path).expect("read").expect("there").public().to_peer_id(), first.public().to_peer_id());
        // A dangling symlink in the way is an error, not an endless retry.
        #[cfg(unix)]
        {
            let other = tmp.path().join("dangling");
            std::os::unix::fs::symlink(tmp.path().join("nowhere"), &other).expect("symlink");
            let e = load_or_create(&other).expect_err("refused");
            assert!(e.to_string().contains("in the way"), "{e}");
        }
    }
}
